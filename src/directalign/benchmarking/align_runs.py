"""The align-step benchmark's runs against TRL's DPOTrainer, which ``pipelines/bench.py`` (`make bench`)
plans, runs each in a fresh process and reports.

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

LoRA runs (``lora_variants``, ``align_lora_tokens_per_s``): the default experiment's adapters (r 16,
alpha 32, all 7 projections, the top 8 layers) on both sides, on prompts with K completions each.
``trl_lora`` is DPOTrainer with its defaults (fp32) and the same ``peft_config``, fed every pair of
those prompts (K (K - 1) / 2 each), ``prompts_per_step`` prompts' worth a step. ``ours_lora`` is the
align stage: prompt-grouped batches of those prompts on the frozen-trunk cache, whose one-off cost
(the trunk states of all ``experiment_prompts`` prompts, timed) is shared by the default experiment's
method runs::

    ours_time_per_step = step_time + cache_time / (n_method_runs * steps_per_run)

with ``steps_per_run = epochs * ceil(experiment_prompts / prompts_per_step)``. Tokens are counted the
same way on both sides: ``prompt + a + prompt + b`` of every pair a step trains (``pair_tokens``;
TRL's batch holds exactly that), so grouping gets no credit for the rows and prompts it shares. The
cost of the align stage when ``n`` method runs share one cache (``scaling_runs``) is
``cache + n * run`` with ``run = steps_per_run * step_time``, reported per method run. FLOPs of
``ours_lora`` by ``benchmarking.lora_step_flops``; TRL's LoRA step is not counted.
"""

import copy
import importlib.util
import logging
import math
import os
import random
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from multiprocessing import get_context
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import DictConfig, OmegaConf

from directalign.benchmarking import (
    BatchShape,
    LoraCounts,
    ParameterCounts,
    StepTimer,
    align_batches,
    align_step_flops,
    align_step_positions,
    benchmark_architecture,
    forward_flops,
    lora_step_flops,
    pair_tokens,
    resolve_device,
    time_align_steps,
    time_calls,
    training_flops,
)

if TYPE_CHECKING:
    from datasets import Dataset
    from peft import PeftConfig
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Ids = dict[str, list[list[int]]]
# The LoRA runs ``lora_variants`` names, and whose step each runs.
LORA_KINDS = {"ours_lora": "ours", "trl_lora": "trl"}


@dataclass(frozen=True)
class Segment:
    """Steps at one batch shape: ``pairs`` a batch, completions ``completion`` times the configured
    lengths, ``warmup`` untimed steps then ``timed`` ones."""

    name: str
    pairs: int
    completion: int
    warmup: int
    timed: int


@dataclass(frozen=True)
class Run:
    """One benchmark run in a fresh process: ``kind`` ours (the align step, with ``share_prompt`` and
    ``activation_checkpointing``) or trl (DPOTrainer with ``trl_args``), over its segments in turn. A
    LoRA run (``lora_worker``) reads only its name and kind."""

    name: str
    kind: str
    segments: tuple[Segment, ...] = ()
    share_prompt: bool = False
    activation_checkpointing: bool = False
    trl_args: dict[str, Any] = field(default_factory=dict)


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
    return [
        {
            "prompt": random_text(rng, words, rng.randint(*prompt_tokens)),
            "chosen": random_text(rng, words, rng.randint(*completion_tokens) - 1),
            "rejected": random_text(rng, words, rng.randint(*completion_tokens) - 1),
        }
        for _ in range(n_pairs)
    ]


def random_text(rng: random.Random, words: list[str], n_words: int) -> str:
    """``n_words`` words of ``word_pool``, each with its leading space: ``n_words`` tokens."""
    return "".join(" " + rng.choice(words) for _ in range(n_words))


def make_groups(words: list[str], n_prompts: int, grouped: dict[str, Any], seed: int) -> list[dict[str, Any]]:
    """Text prompts with K completions each (lengths as ``make_pairs``), and distinct random rewards,
    so every one of a prompt's K (K - 1) / 2 pairs is kept, as the default experiment's rewards are."""
    rng = random.Random(seed)
    k = grouped["completions_per_prompt"]
    return [
        {
            "prompt": random_text(rng, words, rng.randint(*grouped["prompt_tokens"])),
            "completions": [
                random_text(rng, words, rng.randint(*grouped["completion_tokens"]) - 1) for _ in range(k)
            ],
            "rewards": [rng.random() for _ in range(k)],
        }
        for _ in range(n_prompts)
    ]


def group_pairs(groups: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Each group's pairs as TRL's text pairs, in ``pairs.ranked_pairs``'s order (higher reward chosen)."""
    from directalign.pairs import ranked_pairs

    return [
        {"prompt": group["prompt"], "chosen": group["completions"][a], "rejected": group["completions"][b]}
        for group in groups
        for a, b in ranked_pairs(group["rewards"], drop_ties=True)[0]
    ]


def token_ids(tokenizer: "PreTrainedTokenizerBase", pairs: list[dict[str, str]]) -> Ids:
    """The pipeline's tokenisation: prompt ids, and completion ids ending with eos."""
    from directalign.prompts import completion_ids

    return {
        "prompt_ids": [tokenizer(p["prompt"], add_special_tokens=False).input_ids for p in pairs],
        "chosen_ids": completion_ids(tokenizer, [p["chosen"] for p in pairs]),
        "rejected_ids": completion_ids(tokenizer, [p["rejected"] for p in pairs]),
    }


def trl_head_skips_masked_positions(device: str) -> bool:
    """Whether TRL 1.16's fused LM head scores only completion positions: with Triton on a CUDA or XPU
    device (its ``kernels/chunked_logprob`` rule, read here rather than imported from a private name)."""
    return device in ("cuda", "xpu") and importlib.util.find_spec("triton") is not None


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


def ours_step_flops(
    shape: BatchShape, params: ParameterCounts, share_prompt: bool, checkpointing: bool
) -> int:
    """FLOPs an align step executes on its padded batch, with the layers' forward again when they are
    checkpointed (``stage.align.activation_checkpointing``)."""
    flops = align_step_flops(shape, params, share_prompt)
    if checkpointing:
        flops += forward_flops(params, align_step_positions(shape, share_prompt)[0], 0)
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
        for segment, pairs in zip(run.segments, texts, strict=True)
        for batch in align_batches(
            token_ids(tokenizer, pairs), segment.pairs, tokenizer.pad_token_id, model.config.vocab_size
        )
    ]
    setup_s = time.perf_counter() - start
    align_cfg = OmegaConf.create(
        {
            **cfg["align"],
            "share_prompt": run.share_prompt,
            "activation_checkpointing": run.activation_checkpointing,
        }
    )
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
    peft_config: "PeftConfig | None" = None,
) -> float:
    """TRL's DPOTrainer with its defaults but float32; returns the setup seconds (with any precompute).
    With ``peft_config`` TRL wraps the model itself and its reference is the model with adapters off."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class Record(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            timer.start()

        def on_step_end(self, args, state, control, **kwargs):
            timer.stop()

    segment = run.segments[0]
    args = DPOConfig(
        output_dir=folder,
        per_device_train_batch_size=segment.pairs,
        max_steps=segment.warmup + segment.timed,
        bf16=False,
        use_cpu=device == "cpu",
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=cfg["seed"],
        **run.trl_args,
    )
    # A random-init model has no path to load a reference from; a copy is what the path would give.
    precomputed = run.trl_args.get("precompute_ref_log_probs")
    ref_model = None if precomputed or peft_config is not None else copy.deepcopy(model)
    start = time.perf_counter()
    trainer = DPOTrainer(
        model=model,
        ref_model=ref_model,
        args=args,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
        peft_config=peft_config,
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


def quiet() -> None:
    """Silence the libraries' warnings and progress bars in a worker process: the output is the tables."""
    import datasets
    import transformers

    os.environ["TQDM_DISABLE"] = "1"  # TRL's reference precompute bar
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()


def worker(cfg: dict[str, Any], run: Run) -> dict[str, Any]:
    """One run in a fresh process: build the data and model, train, and sort the steps by segment."""
    from transformers import AutoModelForCausalLM

    quiet()
    device = resolve_device(cfg["device"])
    config, tokenizer = benchmark_architecture(cfg)
    words = word_pool(tokenizer)
    texts = [
        make_pairs(
            words,
            segment.pairs * (segment.warmup + segment.timed),
            cfg["prompt_tokens"],
            [segment.completion * length for length in cfg["completion_tokens"]],
            cfg["seed"] + index,
        )
        for index, segment in enumerate(run.segments)
    ]
    torch.manual_seed(cfg["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = ParameterCounts.of(model)
    timer = StepTimer(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if run.kind == "ours":
        setup_s = run_ours(cfg, run, model, tokenizer, texts, device, timer)
        step_flops = partial(
            ours_step_flops,
            params=params,
            share_prompt=run.share_prompt,
            checkpointing=run.activation_checkpointing,
        )
    else:
        with tempfile.TemporaryDirectory() as folder:
            setup_s = run_trl(cfg, run, model, tokenizer, texts[0], device, timer, folder)
        compact_head = trl_head_skips_masked_positions(device)
        step_flops = partial(trl_step_flops, params=params, trl_args=run.trl_args, compact_head=compact_head)
    steps = iter(zip(timer.seconds, timer.shapes, timer.peak_memory, strict=False))
    segments = {}
    for segment in run.segments:
        timed = [next(steps) for _ in range(segment.warmup + segment.timed)][segment.warmup :]
        segments[segment.name] = {
            **asdict(segment),
            "step_s": [seconds for seconds, _, _ in timed],
            "tokens": [shape.tokens for _, shape, _ in timed],
            "flops": [step_flops(shape) for _, shape, _ in timed],
            "peak_rss_mib": timed[-1][2][0],
            "cuda_peak_mib": timed[-1][2][1],
        }
    return {
        **asdict(run),
        "segments": segments,
        "device": device,
        "setup_s": setup_s,
        "non_embedding_params": params.non_embedding,
        "head_params": params.head,
    }


def in_fresh_process(
    cfg: dict[str, Any], run: Run, target: Callable[[dict[str, Any], Run], dict[str, Any]] = worker
) -> dict[str, Any]:
    """``target(cfg, run)`` in a fresh (spawned) process, so its peak memory is its own."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(target, cfg, run).result()


def lora_config(cfg: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """The default experiment's adapters, on the top ``lora_top_layers`` of the model's layers."""
    return {
        **cfg["lora"],
        "layers_to_transform": list(range(num_layers - cfg["lora_top_layers"], num_layers)),
    }


def steps_per_run(grouped: dict[str, Any]) -> int:
    """Optimizer steps of one method run of the default experiment: epochs over its prompts."""
    return grouped["epochs"] * math.ceil(grouped["experiment_prompts"] / grouped["prompts_per_step"])


def group_table(
    tokenizer: "PreTrainedTokenizerBase", groups: list[dict[str, Any]], vocab_size: int
) -> "Dataset":
    """The off-policy table the align stage reads (the pipeline's tokenisation), with the constant
    reference log-probs of ``align_batches``."""
    from datasets import Dataset

    from directalign.prompts import completion_ids

    ref_logp = -math.log(vocab_size)
    completions = [completion_ids(tokenizer, group["completions"]) for group in groups]
    return Dataset.from_dict(
        {
            "prompt_ids": [tokenizer(g["prompt"], add_special_tokens=False).input_ids for g in groups],
            "completion_ids": completions,
            "ref_logps": [[[ref_logp] * len(c) for c in group] for group in completions],
            "reward": [group["rewards"] for group in groups],
        }
    )


def run_ours_lora(
    cfg: dict[str, Any],
    model: "PreTrainedModel",
    tokenizer: "PreTrainedTokenizerBase",
    groups: list[dict[str, Any]],
    device: str,
    timer: StepTimer,
) -> dict[str, Any]:
    """The default experiment's align stage: the trunk states of all its prompts once (timed, as the
    trunk stage computes them), then prompt-grouped steps on the top layers."""
    from directalign.pairs import attach_trunk_states, build_prompt_groups, collate_prompt_groups
    from directalign.stages.trunk import PROMPTS_PER_FORWARD
    from directalign.trunk import first_trained_layer, trunk_states

    grouped, pad_id = cfg["grouped"], tokenizer.pad_token_id
    start = time.perf_counter()
    table = group_table(tokenizer, groups, model.config.vocab_size)
    items, _ = build_prompt_groups(table, drop_ties=True)
    setup_s = time.perf_counter() - start
    first_layer = first_trained_layer(model)
    if first_layer is None:
        raise RuntimeError("the LoRA layers reach layer 0: there is no frozen trunk to cache")
    model.to(device)
    cache = time_calls(
        lambda: trunk_states(
            model, table["prompt_ids"], table["completion_ids"], first_layer, pad_id, PROMPTS_PER_FORWARD
        ),
        device,
        repeats=1,
    )
    attach_trunk_states(items, cache.result)
    size, steps = grouped["prompts_per_step"], grouped["warmup_steps"] + grouped["timed_steps"]
    batches = [collate_prompt_groups(items[i : i + size], pad_id) for i in range(0, steps * size, size)]
    lightning = {**cfg["lightning"], "accelerator": "gpu" if device == "cuda" else "cpu"}
    align_cfg, method_cfg = OmegaConf.create(cfg["align"]), OmegaConf.create(cfg["method"])
    time_align_steps(model, batches, align_cfg, method_cfg, lightning, timer, first_layer)
    counts = LoraCounts.of(model, first_layer)
    return {
        "setup_s": setup_s,
        "cache_s": cache.seconds[0],
        "first_layer": first_layer,
        "tokens": [pair_tokens(batch) for batch in batches],
        "flops": [
            lora_step_flops(BatchShape.of(batch), int(batch["prompt_index"].max()) + 1, counts)
            for batch in batches
        ],
    }


def lora_worker(cfg: dict[str, Any], run: Run) -> dict[str, Any]:
    """One LoRA run in a fresh process: the default experiment's adapters and batches, ours or TRL's."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from directalign.models import with_lora

    quiet()
    device = resolve_device(cfg["device"])
    config, tokenizer = benchmark_architecture(cfg)
    grouped = cfg["grouped"]
    steps, size = grouped["warmup_steps"] + grouped["timed_steps"], grouped["prompts_per_step"]
    if steps * size > grouped["experiment_prompts"]:
        raise ValueError("grouped: the timed steps need more prompts than experiment_prompts holds")
    groups = make_groups(word_pool(tokenizer), grouped["experiment_prompts"], grouped, cfg["seed"])
    lora = lora_config(cfg, config.num_hidden_layers)
    torch.manual_seed(cfg["seed"])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    timer = StepTimer(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if run.kind == "ours":
        model = with_lora(model, OmegaConf.create(lora))
        result = run_ours_lora(cfg, model, tokenizer, groups, device, timer)
    else:
        k = grouped["completions_per_prompt"]
        segment = Segment("base", size * k * (k - 1) // 2, 1, grouped["warmup_steps"], grouped["timed_steps"])
        trl_run = replace(run, segments=(segment,))
        pairs = group_pairs(groups[: steps * size])
        with tempfile.TemporaryDirectory() as folder:
            setup_s = run_trl(
                cfg, trl_run, model, tokenizer, pairs, device, timer, folder, LoraConfig(**lora)
            )
        result = {"setup_s": setup_s, "tokens": [shape.tokens for shape in timer.shapes]}
    warmup = grouped["warmup_steps"]
    rss, cuda = timer.peak_memory[-1]
    return {
        **asdict(run),
        **result,
        "lora": lora,
        "device": device,
        "step_s": timer.seconds[warmup:],
        "tokens": result["tokens"][warmup:],
        "flops": result.get("flops", [])[warmup:],
        "peak_rss_mib": rss,
        "cuda_peak_mib": cuda,
    }


def amortised_step_s(result: dict[str, Any], grouped: dict[str, Any]) -> list[float]:
    """Each timed step plus its share of the trunk cache: ``step_time + cache_time / (n_method_runs x
    steps_per_run)``, every method run of the default experiment training on the one cache."""
    share = result.get("cache_s", 0.0) / (grouped["n_method_runs"] * steps_per_run(grouped))
    return [seconds + share for seconds in result["step_s"]]


def summarise_lora(result: dict[str, Any], grouped: dict[str, Any], peak: float) -> dict[str, float | None]:
    """Medians and min-max spreads of a LoRA run, its rates on the amortised step times; FLOPs where
    counted (ours)."""
    times, amortised, flops = result["step_s"], amortised_step_s(result, grouped), result["flops"]
    rates = [tokens / t for tokens, t in zip(result["tokens"], amortised, strict=True)]
    return {
        "step_s": statistics.median(times),
        "step_s_min": min(times),
        "step_s_max": max(times),
        "amortised_step_s": statistics.median(amortised),
        "tokens_per_step": statistics.mean(result["tokens"]),
        "tokens_per_s": statistics.median(rates),
        "tokens_per_s_min": min(rates),
        "tokens_per_s_max": max(rates),
        "tflop_per_step": statistics.mean(flops) / 1e12 if flops else None,
        "peak_fraction": (
            statistics.median(f / t / peak for f, t in zip(flops, times, strict=True)) if flops else None
        ),
    }


def trunk_scaling(ours: dict[str, Any], grouped: dict[str, Any]) -> dict[int, float]:
    """Seconds per method run when ``n`` runs share one trunk cache: ``(cache + n x run) / n``, a run
    being ``steps_per_run`` steps of the median step time."""
    run_s = steps_per_run(grouped) * ours["summary"]["step_s"]
    return {n: (ours["cache_s"] + n * run_s) / n for n in grouped["scaling_runs"]}


def lora_report(results: list[dict[str, Any]], grouped: dict[str, Any]) -> list[str]:
    """Markdown tables of the LoRA runs and of the align stage's cost per method run sharing one cache."""
    lora, steps = results[0]["lora"], steps_per_run(grouped)
    lines = [
        "",
        f"LoRA r {lora['r']} on the top {len(lora['layers_to_transform'])} layers, "
        f"{grouped['prompts_per_step']} prompts x K={grouped['completions_per_prompt']} completions a step; "
        f"amortised step = step + cache / (n_method_runs {grouped['n_method_runs']} x steps_per_run {steps})",
        "",
        "| run | step s (median, min-max) | cache s | amortised step s | pair tokens/step | tokens/s "
        "(median, min-max) | TFLOP/step | % of matmul peak | setup s | peak RSS MiB | CUDA peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        s = result["summary"]
        tflop = "-" if s["tflop_per_step"] is None else f"{s['tflop_per_step']:.3f}"
        fraction = "-" if s["peak_fraction"] is None else f"{100 * s['peak_fraction']:.1f}"
        cache = f"{result['cache_s']:.1f}" if "cache_s" in result else "-"
        cuda = f"{result['cuda_peak_mib']:.0f}" if result["cuda_peak_mib"] is not None else "-"
        lines.append(
            f"| {result['name']} | {s['step_s']:.2f} ({s['step_s_min']:.2f}-{s['step_s_max']:.2f}) "
            f"| {cache} | {s['amortised_step_s']:.3f} | {s['tokens_per_step']:.0f} "
            f"| {s['tokens_per_s']:.0f} ({s['tokens_per_s_min']:.0f}-{s['tokens_per_s_max']:.0f}) "
            f"| {tflop} | {fraction} | {result['setup_s']:.1f} | {result['peak_rss_mib']:.0f} | {cuda} |"
        )
    ours = next((r for r in results if "scaling" in r), None)
    if ours is None:
        return lines
    lines += [
        "",
        f"Align stage on one trunk cache: total = cache {ours['cache_s']:.1f} s + n x run "
        f"{steps * ours['summary']['step_s']:.1f} s (run = {steps} steps x median step)",
        "",
        "| method runs n | total s | s per method run |",
        "|---|---|---|",
    ]
    lines += [f"| {n} | {n * per_run:.1f} | {per_run:.1f} |" for n, per_run in ours["scaling"].items()]
    return lines


def plan(cfg: DictConfig) -> list[Run]:
    """The runs at the default shape; ``ours`` goes on with the scaled shapes (model and optimizer warm)."""
    trl_args = {
        "trl": {},
        "trl_precompute": {"precompute_ref_log_probs": True},
        "trl_no_checkpointing": {"gradient_checkpointing": False},
    }
    base = Segment("base", cfg.pairs, 1, cfg.warmup_steps, cfg.timed_steps)
    scaled = [
        Segment(shape.name, cfg.pairs * shape.pairs, shape.completion, 0, cfg.scaling_timed_steps)
        for shape in cfg.scaling
    ]
    runs = []
    for name in cfg.variants:
        if name in ("ours", "ours_plain", "ours_checkpointing"):
            runs.append(
                Run(
                    name,
                    "ours",
                    (base, *scaled) if name == "ours" else (base,),
                    # Checkpointed layers drop the KV cache that prompt sharing runs on (lit/align.py).
                    share_prompt=name == "ours",
                    activation_checkpointing=name == "ours_checkpointing",
                )
            )
        else:
            runs.append(Run(name, "trl", (base,), trl_args=trl_args[name]))
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
