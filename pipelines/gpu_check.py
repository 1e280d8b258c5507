"""GPU check (`make gpu-check`): the smoke experiment with trainer=gpu (bf16), then the align step's
throughput and model FLOPs utilisation on a random-init 1B Llama-architecture model.

Writes ``<out>/gpu_check.json`` and prints one line per figure; results/benchmarks.md records them
with the card's name. Needs a CUDA GPU; run from the repository root.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 tensor-core peaks from NVIDIA's data sheets (SXM parts), in FLOP/s.
DATASHEET_BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


class StepTimer(L.Callback):
    """Wall time of each optimiser step, synchronised with the GPU."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self.start)


def measured_matmul_peak(size: int = 8192, repeats: int = 20) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def synthetic_pairs(n_pairs: int, prompt_len: int, completion_len: int, vocab: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)

    def tokens(length: int) -> list[int]:
        return torch.randint(10, vocab, (length,), generator=generator).tolist()

    return [
        {
            "prompt": tokens(prompt_len),
            "a": tokens(completion_len),
            "b": tokens(completion_len),
            "ref_a": [-2.0] * completion_len,
            "ref_b": [-2.0] * completion_len,
            "reward_a": 1.0,
            "reward_b": 0.0,
        }
        for _ in range(n_pairs)
    ]


def align_throughput(args: argparse.Namespace) -> dict:
    """Train DPO steps of the real AlignModule under Lightning (bf16-mixed) and time them."""
    from directalign.lit.align import AlignModule
    from directalign.pairs import collate_pairs

    arch = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/llama_1b_random.yaml").architecture)
    config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=49152, **arch)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    n_embedding = model.get_input_embeddings().weight.numel()
    stage_cfg = OmegaConf.create(
        {"lr": 1e-5, "weight_decay": 0.0, "scheduler": "constant", "warmup_ratio": 0.0, "share_prompt": False}
    )
    method = OmegaConf.create({"name": "dpo", "loss": "dpo", "beta": 0.1, "length_power": 0.0})
    steps = args.warmup_steps + args.timed_steps
    pairs = synthetic_pairs(args.pairs_per_step * steps, args.prompt_len, args.completion_len, 49152)
    loader = DataLoader(pairs, batch_size=args.pairs_per_step, collate_fn=lambda rows: collate_pairs(rows, 0))
    timer = StepTimer()
    trainer = L.Trainer(
        accelerator="gpu",
        devices=1,
        precision="bf16-mixed",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(AlignModule(model, stage_cfg, method), train_dataloaders=loader)
    step_time = sorted(timer.times[args.warmup_steps :])[len(timer.times[args.warmup_steps :]) // 2]
    tokens = 2 * args.pairs_per_step * (args.prompt_len + args.completion_len)
    # Training FLOPs ~ 6 x non-embedding parameters x tokens, plus the LM head on completion positions.
    head_flops = 6 * n_embedding * 2 * args.pairs_per_step * args.completion_len
    flops = 6 * (n_params - n_embedding) * tokens + head_flops
    name = torch.cuda.get_device_name()
    datasheet = next((peak for key, peak in DATASHEET_BF16_PEAK.items() if key in name), None)
    measured = measured_matmul_peak()
    return {
        "device": name,
        "params": n_params,
        "tokens_per_step": tokens,
        "median_step_s": step_time,
        "tokens_per_s": tokens / step_time,
        "model_tflops_per_s": flops / step_time / 1e12,
        "mfu_vs_datasheet": flops / step_time / datasheet if datasheet else None,
        "measured_bf16_matmul_tflops": measured / 1e12,
        "mfu_vs_measured_matmul": flops / step_time / measured,
        "cuda_peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def smoke_on_gpu(out: Path, extra: list[str]) -> dict:
    """The smoke experiment end to end with trainer=gpu (bf16), timed."""
    command = [
        sys.executable,
        "pipelines/run.py",
        "experiment=smoke",
        "trainer=gpu",
        "logger=csv",
        f"paths.store={out}/store",
        f"paths.results_dir={out}/smoke_results",
        f"hydra.run.dir={out}/hydra",
        *extra,
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "outputs/gpu_check")))
    parser.add_argument("--skip-smoke", action="store_true")
    parser.add_argument("--pairs-per-step", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--completion-len", type=int, default=128)
    parser.add_argument("--warmup-steps", type=int, default=3)
    parser.add_argument("--timed-steps", type=int, default=10)
    parser.add_argument("smoke_overrides", nargs="*", help="extra Hydra overrides for the smoke run")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu-check: no CUDA GPU visible")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"torch": torch.__version__, "align_1b": align_throughput(args)}
    print(json.dumps(report["align_1b"], indent=2), flush=True)
    if not args.skip_smoke:
        report["smoke"] = smoke_on_gpu(args.out, args.smoke_overrides)
        print(f"smoke: returncode={report['smoke']['returncode']} wall_s={report['smoke']['wall_s']:.1f}")
        print(report["smoke"]["summary"] or "")
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
