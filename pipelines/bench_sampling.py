"""Sampling against the machine's limit and against an inference engine: `python pipelines/bench_sampling.py`
(`make bench`).

At an experiment's generate and evaluate shapes (each stage's samples a prompt and batch size, the task's
prompts in the model's chat template, its completion budget), on the experiment's model with its real
weights, so completions end at eos as in a run: ``generation.sample_completions`` as each stage calls it,
and ctranslate2 (the engine a CPU user would pick; it converts a transformers Llama directly) on the same
model in float32, the same prompts, batches and temperature. Tokens count every sampled token, eos
included. ``generate_mfu`` is the useful FLOPs a second over the float32 matmul peak measured in the same
run, FLOPs by the align step's model (``benchmarking.sampling_flops``), so padding, finished rows and
repeated prefills are not credited to either side. The evaluate shape also records the hidden states
entering the first LoRA layer (what scores the reference on the shared trunk); the engine cannot. There
ours runs twice: on the prompts alone (the first policy evaluated in a process), and from the reference's
prompt cache (``prompt_cache.py``, built untimed: every later policy), whose prefill runs only the layers
above the trunk and whose FLOPs count only those.
"""

import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from transformers import AutoModelForCausalLM

from directalign.benchmarking import ParameterCounts, matmul_peak_flops, sampling_flops
from directalign.generation import sample_completions
from directalign.models import build_policy, pretrained_source, with_lora
from directalign.prompt_cache import PromptCache, build_prompt_cache
from directalign.prompts import Prompts
from directalign.sampling import Sampling
from directalign.stages.context import StageContext
from directalign.store import Store
from directalign.tasks import build_task
from directalign.trunk import first_trained_layer

# Each benchmarked stage: the split it samples and whether it records the trunk's states.
STAGES = {"generate": ("offpolicy", False), "evaluate": ("eval", True)}


def first_lora_layer(cfg: DictConfig, model) -> int | None:
    """The lowest layer the experiment's align LoRA trains (``trunk.first_trained_layer`` on a weightless
    copy with its adapters): where evaluation records the trunk's states."""
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model.config)
    return first_trained_layer(with_lora(skeleton, cfg.stage.align.get("lora")))


def ours(
    model,
    tokenizer,
    prompts: list[list[int]],
    sampling: Sampling,
    layer: int | None,
    seed: int,
    prompt_cache: PromptCache | None = None,
):
    """``sample_completions`` with the options the stage passes (log-probs, the trunk's states and the
    reference's prompt cache)."""
    options = sampling.options() | {"return_logps": True, "layer_inputs": layer, "prompt_cache": prompt_cache}
    return sample_completions(model, tokenizer, prompts, seed=seed, desc="ours", **options)[0]


def ctranslate2_generator(model_dir: str, out_dir: Path):
    """The model converted to ctranslate2 in float32 (once), loaded on this process's threads."""
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    if not (out_dir / "model.bin").exists():
        TransformersConverter(model_dir).convert(str(out_dir), quantization="float32", force=True)
    return ctranslate2.Generator(
        str(out_dir), device="cpu", compute_type="float32", intra_threads=torch.get_num_threads()
    )


def engine(generator, tokenizer, prompts: list[list[int]], sampling: Sampling, seed: int):
    """The same prompts in the same length-sorted batches, ``num_samples`` hypotheses each, sampled from
    the whole vocabulary (``sampling_topk=0``), stopping at the tokenizer's eos, which is returned."""
    import ctranslate2

    ctranslate2.set_random_seed(seed)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[list[int]]] = [[] for _ in prompts]
    for start in range(0, len(order), sampling.batch_size):
        rows = order[start : start + sampling.batch_size]
        batch = generator.generate_batch(
            [tokenizer.convert_ids_to_tokens(prompts[i]) for i in rows],
            max_length=sampling.max_new_tokens,
            sampling_topk=0,
            sampling_topp=sampling.top_p,
            sampling_temperature=sampling.temperature,
            num_hypotheses=sampling.num_samples,
            include_prompt_in_result=False,
            end_token=tokenizer.eos_token,
            return_end_token=True,
        )
        for i, result in zip(rows, batch, strict=True):
            results[i] = [list(ids) for ids in result.sequences_ids]
    return results


def timed(sample, repeats: int) -> tuple[float, Any]:
    """The fastest of ``repeats`` calls, and the samples of the last."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = sample()
        best = min(best, time.perf_counter() - start)
    return best, result


def measure(
    name: str,
    seconds: float,
    samples,
    prompts: Prompts,
    params: ParameterCounts,
    peak: float,
    eos: int,
    prompt_layer_share: float,
):
    tokens = [len(c) for group in samples for c in group]
    flops = sampling_flops(params, [len(p) for p in prompts.ids], samples, prompt_layer_share)
    return {
        "sampler": name,
        "seconds": seconds,
        "tokens": sum(tokens),
        "tokens_per_s": sum(tokens) / seconds,
        "mean_completion_tokens": sum(tokens) / len(tokens),
        "ended_at_eos": sum(c[-1:] == [eos] for group in samples for c in group) / len(tokens),
        "flops": flops,
        "mfu": flops / seconds / peak,
    }


@hydra.main(config_path="../conf", config_name="bench_sampling", version_base="1.3")
def main(bench: DictConfig) -> None:
    cfg = compose(config_name="config", overrides=[f"experiment={bench.experiment}"])
    peak = matmul_peak_flops("cpu", bench.matmul_size, bench.matmul_repeats, bench.matmul_warmup)
    store = Store(cfg.paths.store)
    ctx = StageContext(cfg, store, build_task(cfg.task, store.root / "tasks" / cfg.task.name))
    tokenizer = ctx.tokenizer
    model = build_policy(cfg.model, store.root, len(tokenizer), cfg.seed).eval()
    params = ParameterCounts.of(model)
    generator = None
    if bench.engine == "ctranslate2":
        folder = store.root / "models" / f"{cfg.model.name}_ct2_float32"
        generator = ctranslate2_generator(pretrained_source(cfg.model, store.root), folder)
    elif bench.engine is not None:
        raise SystemExit(f"directalign: bench engine must be ctranslate2 or null, got {bench.engine!r}")
    print(
        f"experiment={bench.experiment} model={cfg.model.name} threads={torch.get_num_threads()}"
        f" matmul_peak_gflops={peak / 1e9:.1f}",
        flush=True,
    )
    rows = [
        bench_shape(bench, cfg, ctx, stage, model, generator, params, peak)
        for stage in STAGES
        if stage in bench.stages
    ]
    out = Path(HydraConfig.get().runtime.output_dir)
    summary = {"matmul_peak_flops": peak, "shapes": rows}
    (out / "bench_sampling.json").write_text(json.dumps(summary, indent=2))


def bench_shape(bench, cfg, ctx, stage: str, model, generator, params: ParameterCounts, peak: float) -> dict:
    """Ours, then the engine, at one stage's shape: one untimed batch each, then the timed prompts."""
    split, records_trunk = STAGES[stage]
    prompts = ctx.prompts(split, bench.prompts, None)
    sampling = Sampling.of(cfg, stage)
    layer = first_lora_layer(cfg, model) if records_trunk else None
    tokenizer = ctx.tokenizer
    as_the_stage = partial(ours, model, tokenizer, sampling=sampling, layer=layer, seed=bench.seed)
    samplers, layer_share = {"ours": as_the_stage}, {}
    if layer:
        cache = build_prompt_cache(model, prompts.ids, layer, tokenizer.pad_token_id, sampling.batch_size)
        samplers["ours_prompt_cache"] = partial(as_the_stage, prompt_cache=cache)
        layer_share["ours_prompt_cache"] = 1 - layer / model.config.num_hidden_layers
    if generator is not None:
        samplers["ctranslate2"] = partial(engine, generator, tokenizer, sampling=sampling, seed=bench.seed)
    results = {}
    for name, sample in samplers.items():
        sample(prompts.ids[: sampling.batch_size])
        seconds, samples = timed(partial(sample, prompts.ids), bench.repeats)
        eos, share = tokenizer.eos_token_id, layer_share.get(name, 1.0)
        results[name] = r = measure(name, seconds, samples, prompts, params, peak, eos, share)
        print(
            f"{stage} {name}: {r['tokens_per_s']:.1f} tokens/s ({r['tokens']} tokens in {seconds:.1f} s,"
            f" {r['mean_completion_tokens']:.1f} a completion, {r['ended_at_eos']:.0%} at eos),"
            f" mfu {r['mfu']:.2f}",
            flush=True,
        )
    for mine in [name for name in results if name.startswith("ours")]:
        line = f"generate_mfu stage={stage} {mine}={results[mine]['mfu']:.2f}"
        if "ctranslate2" in results:
            ratio = results[mine]["tokens_per_s"] / results["ctranslate2"]["tokens_per_s"]
            line += f" engine={results['ctranslate2']['mfu']:.2f} {mine}/engine_tokens_per_s={ratio:.2f}"
        print(line, flush=True)
    return {
        "stage": stage,
        "prompts": len(prompts.ids),
        "num_samples": sampling.num_samples,
        "batch_size": sampling.batch_size,
        "max_new_tokens": sampling.max_new_tokens,
        "mean_prompt_tokens": sum(map(len, prompts.ids)) / len(prompts.ids),
        "records_trunk_layer": layer,
        "results": list(results.values()),
    }


if __name__ == "__main__":
    main()
