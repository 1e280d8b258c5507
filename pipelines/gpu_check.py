"""GPU check (`make gpu-check`): the align step's throughput and model FLOPs utilisation on a
random-init 1B Llama-architecture model (bf16-mixed), then the smoke experiment with trainer=gpu.

Config ``conf/gpu_check.yaml``; Hydra overrides change it, e.g. ``smoke.run=false`` to skip the
smoke run, ``timed_steps=20``, ``'smoke.extra_overrides=["stage.align.batch_size=2"]'``. Writes
``gpu_check.json`` into the Hydra run folder (``$OUT``, else ``outputs/gpu_check``) and prints one
line per figure, to be recorded with the card's name. FLOPs follow the FLOP
model of ``directalign.benchmarking``. Needs a CUDA GPU; run from the repository root.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from directalign.benchmarking import (
    ParameterCounts,
    StepTimer,
    align_batches,
    align_step_flops,
    cuda_peak_mib,
    matmul_peak_flops,
    time_align_steps,
)

ROOT = Path(__file__).resolve().parents[1]


def random_pair_ids(cfg: DictConfig, n_pairs: int) -> dict[str, list[list[int]]]:
    """Prompts and completions of random token ids, every one of the configured length."""
    generator = torch.Generator().manual_seed(cfg.seed)

    def sequences(length: int) -> list[list[int]]:
        return torch.randint(
            cfg.min_token_id, cfg.vocab_size, (n_pairs, length), generator=generator
        ).tolist()

    return {
        "prompt_ids": sequences(cfg.prompt_tokens),
        "chosen_ids": sequences(cfg.completion_tokens),
        "rejected_ids": sequences(cfg.completion_tokens),
    }


def datasheet_peak(cfg: DictConfig, device_name: str) -> float | None:
    """The card's dense bf16 peak from the config's data-sheet table, None for a card not listed."""
    return next((peak for key, peak in cfg.datasheet_bf16_peak_flops.items() if key in device_name), None)


def align_throughput(cfg: DictConfig, store: Path) -> dict:
    """Train DPO steps of the real AlignModule under Lightning (bf16-mixed by default) and time them."""
    from directalign.models import build_policy

    model = build_policy(cfg.model, store, cfg.vocab_size, cfg.seed)
    params = ParameterCounts.of(model)
    steps = cfg.warmup_steps + cfg.timed_steps
    ids = random_pair_ids(cfg, cfg.pairs_per_step * steps)
    batches = align_batches(ids, cfg.pairs_per_step, cfg.pad_token_id, cfg.vocab_size)
    timer = StepTimer("cuda")
    torch.cuda.reset_peak_memory_stats()
    lightning = OmegaConf.to_container(cfg.lightning, resolve=True)
    time_align_steps(model, batches, cfg.align, cfg.method, lightning, timer)
    cuda_peak_gib = cuda_peak_mib() / 1024
    step_time = statistics.median(timer.seconds[cfg.warmup_steps :])
    timed_shapes = timer.shapes[cfg.warmup_steps :]
    tokens = statistics.mean(shape.tokens for shape in timed_shapes)
    flops = statistics.mean(align_step_flops(shape, params, cfg.align.share_prompt) for shape in timed_shapes)
    name = torch.cuda.get_device_name()
    datasheet = datasheet_peak(cfg, name)
    measured = matmul_peak_flops(
        "cuda", cfg.matmul_size, cfg.matmul_repeats, cfg.matmul_warmup, torch.bfloat16
    )
    return {
        "device": name,
        "params": sum(p.numel() for p in model.parameters()),
        "tokens_per_step": tokens,
        "median_step_s": step_time,
        "tokens_per_s": tokens / step_time,
        "model_tflops_per_s": flops / step_time / 1e12,
        "mfu_vs_datasheet": flops / step_time / datasheet if datasheet else None,
        "measured_bf16_matmul_tflops": measured / 1e12,
        "mfu_vs_measured_matmul": flops / step_time / measured,
        "cuda_peak_memory_gib": cuda_peak_gib,
    }


def smoke_on_gpu(cfg: DictConfig, out: Path) -> dict:
    """The smoke experiment end to end (by default with trainer=gpu, bf16), timed."""
    command = [
        sys.executable,
        "pipelines/run.py",
        *cfg.smoke.overrides,
        f"paths.store={out}/store",
        f"paths.results_dir={out}/smoke_results",
        f"hydra.run.dir={out}/hydra",
        *cfg.smoke.extra_overrides,
    ]
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env=os.environ)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        print(result.stderr[-4000:], file=sys.stderr)
    summary = out / "smoke_results" / "summary.md"
    return {
        "returncode": result.returncode,
        "wall_s": wall,
        "summary": summary.read_text() if summary.is_file() else None,
    }


@hydra.main(config_path="../conf", config_name="gpu_check", version_base="1.3")
def main(cfg: DictConfig) -> None:
    if not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA GPU visible")
    out = Path(HydraConfig.get().runtime.output_dir)
    report = {"torch": torch.__version__, "align_1b": align_throughput(cfg, out / "store")}
    print(json.dumps(report["align_1b"], indent=2), flush=True)
    if cfg.smoke.run:
        report["smoke"] = smoke_on_gpu(cfg, out)
        print(f"smoke: returncode={report['smoke']['returncode']} wall_s={report['smoke']['wall_s']:.1f}")
        print(report["smoke"]["summary"] or "")
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
