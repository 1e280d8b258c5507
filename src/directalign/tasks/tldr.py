"""Reddit TL;DR summarisation from the HuggingFace hub (paper B's LLM setup); needs network or local files.

SFT data: ``trl-lib/tldr`` (columns ``prompt``, ``completion``), OpenAI's filtered TL;DR set formatted as
``"SUBREDDIT: r/{subreddit}\\n\\nTITLE: {title}\\n\\nPOST: {post}\\n\\nTL;DR:"`` and ``" " + summary``; it
is stored as parquet, so it loads with current ``datasets`` (which no longer runs loading scripts).
Human preferences: ``openai/summarize_from_feedback``, config ``comparisons``, through the hub's parquet
export (``revision: refs/convert/parquet``, ``data_dir: comparisons``), since the repository's main
branch only holds a loading script. Columns: ``info`` (``id``, ``post``, ``title``, ``subreddit``...),
``summaries`` (two ``{text, policy, note}``), ``choice`` (index of the preferred summary).

Each data source is one ``load_dataset(**spec)`` call, so ``path: json`` plus ``data_files`` reads local
files in the hub's schema (the tests do) through the very code that reads the hub.
"""

import functools
import hashlib
import logging

import datasets
from omegaconf import DictConfig, OmegaConf

from directalign.errors import DataError
from directalign.tasks.base import EXAMPLE_COLUMNS, PREFERENCE_COLUMNS, SPLITS, Task, assign_splits, split_of

log = logging.getLogger(__name__)

PROMPT_SUFFIX = "\n\nTL;DR:"
SFT_COLUMNS = ("prompt", "completion")
COMPARISON_COLUMNS = ("info", "summaries", "choice")
INFO_FIELDS = ("post", "title", "subreddit")


def load(spec: DictConfig) -> tuple[datasets.Dataset, str]:
    """One split of a data source and a name for it in error messages (the local files or the hub id)."""
    kwargs = {key: value for key, value in OmegaConf.to_container(spec).items() if value is not None}
    origin = str(spec.data_files) if spec.data_files else f"{spec.path} ({spec.split})"
    return datasets.load_dataset(**kwargs), origin


def require(fields: object, names: tuple[str, ...], what: str, origin: str) -> None:
    """Fail early, naming the missing column and the file, when data does not follow the hub schema."""
    missing = [name for name in names if name not in fields]
    if missing:
        raise DataError(f"{origin}: {what} lacks {missing} (has {list(fields)}); expected the hub's schema")


def post_source(subreddit: str, title: str, post: str) -> str:
    """The post as ``trl-lib/tldr`` prompts show it, without the trailing ``TL;DR:`` cue (the
    instruction asks for the summary), so SFT prompts and preference prompts are the same text."""
    return f"SUBREDDIT: r/{subreddit}\n\nTITLE: {title}\n\nPOST: {post}".strip()


def content_id(text: str) -> str:
    """Neither hub set has a post id shared with the other: a hash of the post text links them."""
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def to_example(row: dict) -> dict[str, str]:
    source = row["prompt"].removesuffix(PROMPT_SUFFIX).strip()
    return {"id": content_id(source), "source": source, "reference": row["completion"].strip()}


def to_preference(row: dict) -> dict[str, str]:
    info, texts = row["info"], [summary["text"].strip() for summary in row["summaries"]]
    source = post_source(info["subreddit"], info["title"], info["post"])
    chosen, rejected = texts[row["choice"]], texts[1 - row["choice"]]
    return {
        "id": content_id(f"{source}\n{chosen}\n{rejected}"),
        "post_id": content_id(source),
        "source": source,
        "chosen": chosen,
        "rejected": rejected,
    }


class TldrTask(Task):
    """Summarise a Reddit post; human preference pairs come from summarize_from_feedback. No gold judge:
    as in paper B, the reward model trained on the human pairs is the reference scorer."""

    @functools.cached_property
    def _splits(self) -> dict[str, datasets.Dataset]:
        data, origin = load(self.cfg.sft_data)
        require(data.column_names, SFT_COLUMNS, "dataset", origin)
        examples = data.map(to_example, remove_columns=data.column_names).to_pandas()
        examples = examples.drop_duplicates("id")
        return assign_splits(
            examples, self.cfg.split_fractions, self.cfg.split_salt, self.cfg.max_examples_per_split
        )

    def examples(self, split: str) -> datasets.Dataset:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self._splits[split].select_columns(list(EXAMPLE_COLUMNS))

    def human_preferences(self) -> datasets.Dataset:
        """Human comparison pairs, minus those on posts of ``exclude_preference_splits``."""
        data, origin = load(self.cfg.preference_data)
        require(data.column_names, COMPARISON_COLUMNS, "dataset", origin)
        require(data.features["info"], INFO_FIELDS, "column 'info'", origin)
        require(data.features["summaries"].feature, ("text",), "column 'summaries'", origin)
        reddit = data.filter(lambda row: bool(row["info"]["post"]))
        pairs = reddit.map(to_preference, remove_columns=data.column_names)
        excluded = set(self.cfg.exclude_preference_splits)
        kept = pairs.filter(
            lambda row: (
                split_of(row["post_id"], self.cfg.split_fractions, self.cfg.split_salt) not in excluded
            )
        )
        log.info(
            "tldr: %d human pairs kept of %d comparisons (%d non-Reddit, %d on %s posts)",
            len(kept),
            len(data),
            len(data) - len(reddit),
            len(pairs) - len(kept),
            sorted(excluded),
        )
        return kept.select_columns(list(PREFERENCE_COLUMNS))
