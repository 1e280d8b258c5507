"""Run the stages of ``cfg.pipeline`` in order, reusing every completed artifact of the store.

Under data-parallel training every rank runs this same function (Lightning's launcher, torchrun
or SLURM starts them): the store keeps the ranks in step, and only rank 0 writes results and logs.
"""

import json
import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from directalign.report import PolicyResult, log_wandb, write_report
from directalign.stages import align, evaluate, generate, reward, sft
from directalign.stages.align import CURVE_FILE
from directalign.stages.context import StageContext
from directalign.store import Store, is_rank_zero
from directalign.tasks import build_task
from directalign.training import wandb_run_args
from directalign.validation import methods_to_align, validate_config

log = logging.getLogger(__name__)


def run_pipeline(cfg: DictConfig) -> list[dict] | None:
    """All stages up to the last one named in ``cfg.pipeline.stages``; returns the summary rows
    (on rank 0: the other ranks only take part in training)."""
    validate_config(cfg)
    store = Store(cfg.paths.store)
    task = build_task(cfg.task, store.root / "tasks" / cfg.task.name)
    ctx = StageContext(cfg, store, task)
    stages = set(cfg.pipeline.stages)

    sft_artifact = sft.run(ctx)
    if "reward" not in stages:
        return None
    reward_artifact = reward.run(ctx, sft_artifact)
    if "generate" not in stages:
        return None
    generate_artifact = generate.run(ctx, sft_artifact, reward_artifact)
    if "align" not in stages:
        return None
    methods = methods_to_align(cfg)
    aligned = [align.run(ctx, sft_artifact, reward_artifact, generate_artifact, m) for m in methods]
    if "evaluate" not in stages:
        return None

    baseline = evaluate.run(ctx, sft_artifact, reward_artifact, sft_artifact)
    results = [PolicyResult("sft", None, None, baseline.metrics, evaluate.load_samples(baseline))]
    for method, policy in zip(methods, aligned, strict=True):
        evaluation = evaluate.run(ctx, sft_artifact, reward_artifact, policy)
        curve_file = policy.path / CURVE_FILE
        curve = json.loads(curve_file.read_text()) if curve_file.is_file() else []
        results.append(
            PolicyResult(
                method.name,
                method.beta,
                method.length_power,
                evaluation.metrics,
                evaluate.load_samples(evaluation),
                curve,
            )
        )
    if not is_rank_zero():
        return None
    _, examples, _ = ctx.prompts("eval", cfg.stage.evaluate.n_prompts, cfg.stage.evaluate.prompt_offset)
    out = Path(cfg.paths.results_dir)
    rows = write_report(results, examples, out, cfg.seed, OmegaConf.to_container(cfg.contrasts))
    log.info("results written to %s", out)
    if cfg.logger.wandb:
        run_dir = log_wandb(
            results,
            rows,
            out,
            mode="offline" if cfg.logger.wandb.offline else "online",
            dir=cfg.paths.output_dir,
            **wandb_run_args(cfg, "evaluate", evaluation_tags(cfg)),
        )
        log.info("wandb run in %s", run_dir)
    return rows


def evaluation_tags(cfg: DictConfig) -> dict[str, object]:
    """The aligned method's settings as wandb tags; a side-by-side run names its methods instead."""
    if cfg.compare:
        return {"stage": "evaluate", "methods": ",".join(m.name for m in methods_to_align(cfg))}
    method = cfg.method
    return {
        "stage": "evaluate",
        "method": method.name,
        "beta": method.beta,
        "length_power": method.length_power,
    }
