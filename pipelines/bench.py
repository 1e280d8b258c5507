"""Align-step throughput against TRL's DPOTrainer: `python pipelines/bench.py` (`make bench`).

Both train DPO on the same pairs (synthetic word sequences that tokenise to exact lengths), the
same random-init SmolLM2-135M architecture and the same batch shape, in float32. Each run is a
fresh process, so peak memory is its own; the ``ours`` run goes on with the scaled batch shapes.
A step is timed from the batch in hand to the end of the optimizer step (Lightning's
``on_train_batch_start/end``, the HF Trainer's ``on_step_begin/end``), after warm-up steps;
medians and min-max spreads are over the timed steps.

Throughput counts the tokens of the batch, ``attention_mask.sum()`` of the ``2B`` sequences (each
pair's prompt twice, as both layouts hold it), so prompt sharing gets no credit for tokens it skips.
FLOPs are what each implementation executes, from the padded shapes, by the FLOP model of
``directalign.benchmarking``: ``6 N T + 6 H K`` for a training forward and backward over ``T``
token positions with ``K`` positions through the LM head, ``N`` the non-embedding parameters and
``H`` the LM head's ``vocab x hidden``; a frozen forward costs ``2 N T + 2 H K``, gradient
checkpointing adds ``2 N T`` (the layers' forward again). TRL's fused LM head scores every position
on CPU and only completion positions where Triton runs. Attention scores (~4% at these lengths) are
left out.
"""

import copy
import json
import logging
import os
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from directalign.benchmarking import (
    BatchShape,
    ParameterCounts,
    StepTimer,
    align_batches,
    align_step_flops,
    benchmark_architecture,
    forward_flops,
    matmul_peak_flops,
    resolve_device,
    time_align_steps,
    training_flops,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Run = dict[str, Any]
Ids = dict[str, list[list[int]]]


def counting(collate: Callable[[list], dict], shapes: list[BatchShape]) -> Callable[[list], dict]:
    """Wrap a collator to record each batch's shape, in the order batches are made (= trained)."""

    def collate_and_count(rows: list) -> dict:
        batch = collate(rows)
        shapes.append(BatchShape.of(batch))
        return batch

    return collate_and_count


def word_pool(tokenizer: "PreTrainedTokenizerBase", size: int = 1000) -> list[str]:
    """Lower-case words that are one token each with their leading space, so ``n`` words are ``n`` tokens."""
    candidates = sorted(
        (token_id, token[1:])
        for token, token_id in tokenizer.get_vocab().items()
        if token.startswith("Ġ") and len(token) > 3 and token[1:].isascii() and token[1:].isalpha()
    )
    words = []
    for token_id, word in candidates:
        if tokenizer(" " + word, add_special_tokens=False).input_ids == [token_id]:
            words.append(word)
            if len(words) == size:
                break
    return words


def make_pairs(
    words: list[str], n_pairs: int, prompt_tokens: list[int], completion_tokens: list[int], seed: int
) -> list[dict[str, str]]:
    """Text pairs; a completion of ``n`` tokens is ``n - 1`` words and the eos its tokenisation adds."""
    rng = random.Random(seed)

    def text(n_words: int) -> str:
        return "".join(" " + rng.choice(words) for _ in range(n_words))

    return [
        {
            "prompt": text(rng.randint(*prompt_tokens)),
            "chosen": text(rng.randint(*completion_tokens) - 1),
            "rejected": text(rng.randint(*completion_tokens) - 1),
        }
        for _ in range(n_pairs)
    ]


def token_ids(tokenizer: "PreTrainedTokenizerBase", pairs: list[dict[str, str]]) -> Ids:
    """The pipeline's tokenisation: prompt ids, and completion ids ending with eos."""
    from directalign.prompts import completion_ids

    return {
        "prompt_ids": [tokenizer(p["prompt"], add_special_tokens=False).input_ids for p in pairs],
        "chosen_ids": completion_ids(tokenizer, [p["chosen"] for p in pairs]),
        "rejected_ids": completion_ids(tokenizer, [p["rejected"] for p in pairs]),
    }


def trl_step_flops(shape: BatchShape, params: ParameterCounts, trl_args: dict, compact_head: bool) -> int:
    """FLOPs a DPOTrainer step executes on its padded batch: the policy's training step, the layers'
    forward again under gradient checkpointing, and the reference model's forward unless precomputed."""
    positions = shape.rows * shape.width
    head = shape.completion_tokens if compact_head else shape.rows * (shape.width - 1)
    flops = training_flops(params, positions, head)
    if trl_args.get("gradient_checkpointing", True):
        flops += forward_flops(params, positions, 0)
    if not trl_args.get("precompute_ref_log_probs", False):
        flops += forward_flops(params, positions, head)
    return flops


def run_ours(
    cfg: dict[str, Any],
    run: Run,
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    texts: list[list[dict[str, str]]],
    device: str,
    timer: StepTimer,
) -> float:
    """The pipeline's align step over every segment's batches in turn; returns the setup seconds
    (tokenising and collating)."""
    start = time.perf_counter()
    batches = [
        batch
        for segment, pairs in zip(run["segments"], texts, strict=True)
        for batch in align_batches(
            token_ids(tokenizer, pairs), segment["pairs"], tokenizer.pad_token_id, model.config.vocab_size
        )
    ]
    setup_s = time.perf_counter() - start
    align_cfg = OmegaConf.create({**cfg["align"], "share_prompt": run["share_prompt"]})
    lightning = {**cfg["lightning"], "accelerator": "gpu" if device == "cuda" else "cpu"}
    time_align_steps(model, batches, align_cfg, OmegaConf.create(cfg["method"]), lightning, timer)
    return setup_s


def run_trl(
    cfg: dict[str, Any],
    run: Run,
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    pairs: list[dict[str, str]],
    device: str,
    timer: StepTimer,
    folder: str,
) -> float:
    """TRL's DPOTrainer with its defaults but float32; returns the setup seconds (with any precompute)."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            timer.start()

        def on_step_end(self, args, state, control, **kwargs):
            timer.stop()

    segment = run["segments"][0]
    args = DPOConfig(
        output_dir=folder,
        per_device_train_batch_size=segment["pairs"],
        max_steps=segment["warmup"] + segment["timed"],
        bf16=False,
        use_cpu=device == "cpu",
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=cfg["seed"],
        **run["trl_args"],
    )
    # A random-init model has no path to load a reference from; a copy is what the path would give.
    ref_model = None if run["trl_args"].get("precompute_ref_log_probs") else copy.deepcopy(model)
    start = time.perf_counter()
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
    )
    setup_s = time.perf_counter() - start
    prepared = trainer.train_dataset
    for key, expected in token_ids(tokenizer, pairs).items():
        if list(prepared[key]) != expected:
            raise RuntimeError(
                f"TRL tokenised {key} differently from the pipeline: the runs are not comparable"
            )
    trainer.data_collator = counting(trainer.data_collator, timer.shapes)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(Record())
    trainer.train()
    return setup_s


def worker(cfg: dict[str, Any], run: Run) -> dict[str, Any]:
    """One run in a fresh process: build the data and model, train, and sort the steps by segment."""
    import datasets
    import transformers
    from transformers import AutoModelForCausalLM

    os.environ["TQDM_DISABLE"] = "1"  # TRL's reference precompute bar
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    device = resolve_device(cfg["device"])
    config, tokenizer = benchmark_architecture(cfg)
    words = word_pool(tokenizer)
    texts = [
        make_pairs(
            words,
            segment["pairs"] * (segment["warmup"] + segment["timed"]),
            cfg["prompt_tokens"],
            [segment["completion"] * length for length in cfg["completion_tokens"]],
            cfg["seed"] + index,
        )
        for index, segment in enumerate(run["segments"])
    ]
    torch.manual_seed(cfg["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = ParameterCounts.of(model)
    timer = StepTimer(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if run["kind"] == "ours":
        setup_s = run_ours(cfg, run, model, tokenizer, texts, device, timer)
        step_flops = partial(align_step_flops, params=params, share_prompt=run["share_prompt"])
    else:
        from trl.trainer.utils import _use_triton  # whether TRL's LM head skips masked positions

        with tempfile.TemporaryDirectory() as folder:
            setup_s = run_trl(cfg, run, model, tokenizer, texts[0], device, timer, folder)
        compact_head = _use_triton(torch.device(device))
        step_flops = partial(
            trl_step_flops, params=params, trl_args=run["trl_args"], compact_head=compact_head
        )
    steps = iter(zip(timer.seconds, timer.shapes, timer.peak_memory, strict=False))
    segments = {}
    for segment in run["segments"]:
        timed = [next(steps) for _ in range(segment["warmup"] + segment["timed"])][segment["warmup"] :]
        segments[segment["name"]] = {
            **segment,
            "step_s": [seconds for seconds, _, _ in timed],
            "tokens": [shape.tokens for _, shape, _ in timed],
            "flops": [step_flops(shape) for _, shape, _ in timed],
            "peak_rss_mib": timed[-1][2][0],
            "cuda_peak_mib": timed[-1][2][1],
        }
    return {
        **run,
        "segments": segments,
        "device": device,
        "setup_s": setup_s,
        "non_embedding_params": params.non_embedding,
        "head_params": params.head,
    }


def in_fresh_process(cfg: dict[str, Any], run: Run) -> dict[str, Any]:
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(worker, cfg, run).result()


def plan(cfg: DictConfig) -> list[Run]:
    """The runs at the default shape; ``ours`` goes on with the scaled shapes (model and optimizer warm)."""
    trl_args = {
        "trl": {},
        "trl_precompute": {"precompute_ref_log_probs": True},
        "trl_no_checkpointing": {"gradient_checkpointing": False},
    }
    base = {
        "name": "base",
        "pairs": cfg.pairs,
        "completion": 1,
        "warmup": cfg.warmup_steps,
        "timed": cfg.timed_steps,
    }
    scaled = [
        {
            "name": shape.name,
            "pairs": cfg.pairs * shape.pairs,
            "completion": shape.completion,
            "warmup": 0,
            "timed": cfg.scaling_timed_steps,
        }
        for shape in cfg.scaling
    ]
    runs = []
    for name in cfg.variants:
        if name in ("ours", "ours_plain"):
            segments = [base, *scaled] if name == "ours" else [base]
            runs.append({"name": name, "kind": "ours", "share_prompt": name == "ours", "segments": segments})
        else:
            runs.append({"name": name, "kind": "trl", "trl_args": trl_args[name], "segments": [base]})
    return runs


def summarise(segment: dict[str, Any], peak: float) -> dict[str, float]:
    """Medians and min-max spreads over a segment's timed steps."""
    times = segment["step_s"]
    rates = [tokens / t for tokens, t in zip(segment["tokens"], times, strict=True)]
    utilisation = [flops / t / peak for flops, t in zip(segment["flops"], times, strict=True)]
    return {
        "step_s": statistics.median(times),
        "step_s_min": min(times),
        "step_s_max": max(times),
        "tokens_per_step": statistics.mean(segment["tokens"]),
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_min": min(rates),
        "tokens_per_s_max": max(rates),
        "tflop_per_step": statistics.mean(segment["flops"]) / 1e12,
        "peak_fraction": statistics.median(utilisation),
    }


def report(results: list[dict[str, Any]], peak: float) -> list[str]:
    """Markdown tables of the runs at the default shape and of ``ours`` at the scaled shapes."""
    lines = [
        f"float32 matmul peak: {peak / 1e9:.0f} GFLOP/s ({results[0]['device']})",
        "",
        "| run | step s (median, min-max) | tokens/step | tokens/s (median, min-max) | TFLOP/step "
        "| % of matmul peak | setup s | peak RSS MiB | CUDA peak MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        base = result["segments"]["base"]
        s = base["summary"]
        cuda = f"{base['cuda_peak_mib']:.0f}" if base["cuda_peak_mib"] is not None else "-"
        lines.append(
            f"| {result['name']} | {s['step_s']:.2f} ({s['step_s_min']:.2f}-{s['step_s_max']:.2f}) "
            f"| {s['tokens_per_step']:.0f} | {s['tokens_per_s']:.0f} ({s['tokens_per_s_min']:.0f}-"
            f"{s['tokens_per_s_max']:.0f}) | {s['tflop_per_step']:.3f} | {100 * s['peak_fraction']:.1f} "
            f"| {result['setup_s']:.1f} | {base['peak_rss_mib']:.0f} | {cuda} |"
        )
    ours = next((r for r in results if r["name"] == "ours"), None)
    if ours is None:
        return lines
    base = ours["segments"]["base"]["summary"]
    lines += [
        "",
        "| ours at | pairs | completion tokens | tokens/step | step s (min-max) | x step time | x tokens "
        "| x FLOPs | tokens/s | peak RSS so far MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, segment in ours["segments"].items():
        s = segment["summary"]
        lines.append(
            f"| {name} | {segment['pairs']} | x{segment['completion']} | {s['tokens_per_step']:.0f} "
            f"| {s['step_s']:.2f} ({s['step_s_min']:.2f}-{s['step_s_max']:.2f}) "
            f"| {s['step_s'] / base['step_s']:.2f} | {s['tokens_per_step'] / base['tokens_per_step']:.2f} "
            f"| {s['tflop_per_step'] / base['tflop_per_step']:.2f} | {s['tokens_per_s']:.0f} "
            f"| {segment['peak_rss_mib']:.0f} |"
        )
    return lines


@hydra.main(config_path="../conf", config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    device = resolve_device(cfg.device)
    peak = matmul_peak_flops(device, cfg.matmul_size, cfg.matmul_repeats, cfg.matmul_warmup)
    print(
        f"device={device} threads={torch.get_num_threads()} matmul_peak_gflops={peak / 1e9:.1f}", flush=True
    )
    plain_cfg = OmegaConf.to_container(cfg, resolve=True)
    results = []
    for run in plan(cfg):
        result = in_fresh_process(plain_cfg, run)
        for segment in result["segments"].values():
            segment["summary"] = summarise(segment, peak)
        results.append(result)
        s = result["segments"]["base"]["summary"]
        print(f"{run['name']}: {s['tokens_per_s']:.0f} tokens/s, step {s['step_s']:.2f} s", flush=True)
    lines = report(results, peak)
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "bench.json").write_text(json.dumps({"matmul_peak_flops": peak, "runs": results}, indent=2))
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    ours, theirs = (
        next(r for r in results if r["name"] == name)["segments"]["base"]["summary"] for name in cfg.headline
    )
    ours_rate, trl_rate = ours["tokens_per_s"], theirs["tokens_per_s"]
    print(f"align_tokens_per_s ours={ours_rate:.1f} trl={trl_rate:.1f} ratio={ours_rate / trl_rate:.2f}")


if __name__ == "__main__":
    main()
