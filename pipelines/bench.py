"""Align-step throughput against TRL's DPOTrainer: `python pipelines/bench.py` (`make bench`).

What runs, how steps are timed and how tokens and FLOPs are counted: ``directalign.benchmarking.align_runs``.
This script plans the runs (``conf/bench.yaml``), runs each in a fresh process, and writes ``bench.json``
and ``bench.md`` into the Hydra run folder with the headline ratios.
"""

import json
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from directalign.benchmarking import matmul_peak_flops, resolve_device
from directalign.benchmarking.align_runs import (
    LORA_KINDS,
    Run,
    in_fresh_process,
    lora_report,
    lora_worker,
    plan,
    report,
    steps_per_run,
    summarise,
    summarise_lora,
    trunk_scaling,
)


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
        print(f"{run.name}: {s['tokens_per_s']:.0f} tokens/s, step {s['step_s']:.2f} s", flush=True)
    grouped, lora_results = plain_cfg["grouped"], []
    for name in cfg.lora_variants:
        result = in_fresh_process(plain_cfg, Run(name, LORA_KINDS[name]), lora_worker)
        result["summary"] = summarise_lora(result, grouped, peak)
        if "cache_s" in result:
            result["scaling"] = trunk_scaling(result, grouped)
        lora_results.append(result)
        s = result["summary"]
        print(f"{name}: {s['tokens_per_s']:.0f} tokens/s, step {s['step_s']:.2f} s", flush=True)
    lines = (report(results, peak) if results else []) + (
        lora_report(lora_results, grouped) if lora_results else []
    )
    out = Path(HydraConfig.get().runtime.output_dir)
    (out / "bench.json").write_text(
        json.dumps({"matmul_peak_flops": peak, "runs": results, "lora_runs": lora_results}, indent=2)
    )
    (out / "bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    by_name = {r["name"]: r["segments"]["base"]["summary"] for r in results}
    if all(name in by_name for name in cfg.headline):
        ours_rate, trl_rate = (by_name[name]["tokens_per_s"] for name in cfg.headline)
        print(f"align_tokens_per_s ours={ours_rate:.1f} trl={trl_rate:.1f} ratio={ours_rate / trl_rate:.2f}")
    lora_by_kind = {r["kind"]: r for r in lora_results}
    if "ours" in lora_by_kind:
        ours = lora_by_kind["ours"]
        print(
            f"ours_time_per_step = step_time + cache_time / (n_method_runs * steps_per_run)"
            f" = {ours['summary']['step_s']:.3f} + {ours['cache_s']:.2f} /"
            f" ({grouped['n_method_runs']} * {steps_per_run(grouped)}) s;"
            " tokens = prompt + a + prompt + b of each pair trained, on both sides"
        )
        per_run = " ".join(f"n={n}:{seconds:.1f}" for n, seconds in ours["scaling"].items())
        print(f"align_trunk_s_per_method_run {per_run}")
    if {"ours", "trl"} <= lora_by_kind.keys():
        ours_rate, trl_rate = (lora_by_kind[kind]["summary"]["tokens_per_s"] for kind in ("ours", "trl"))
        ratio = ours_rate / trl_rate
        print(f"align_lora_tokens_per_s ours={ours_rate:.1f} trl={trl_rate:.1f} ratio={ratio:.2f}")


if __name__ == "__main__":
    main()
