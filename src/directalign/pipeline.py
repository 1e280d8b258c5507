"""Run the stages of ``cfg.pipeline`` in order, reusing every completed artifact of the store.

Under data-parallel training every rank runs this same function (Lightning's launcher, torchrun
or SLURM starts them): the store keeps the ranks in step, and only rank 0 writes results and logs.
"""

import logging
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from directalign.distributed import is_rank_zero
from directalign.report import PolicyResult, log_wandb, write_report
from directalign.stages import ALIGN, ALIGN_ON_TRUNK, EVALUATE, GENERATE, REWARD, SFT
from directalign.stages.context import StageContext
from directalign.stages.trunk import frozen_trunk
from directalign.store import Store
from directalign.tasks import build_task
from directalign.training import share_sweep_dir_with_ranks, wandb_run_args
from directalign.validation import check_task_data, validate_config

log = logging.getLogger(__name__)


def methods_to_align(cfg: DictConfig) -> dict[str, DictConfig]:
    """The methods to align by name: those of ``compare``, each named by its key, when it is set; else
    the single ``method`` under its own name."""
    return dict(cfg.compare.items()) if cfg.compare else {cfg.method.name: cfg.method}


def run_pipeline(cfg: DictConfig, overrides: Sequence[str] = ()) -> list[dict] | None:
    """All stages up to the last one named in ``cfg.pipeline.stages``; returns the summary rows
    (on rank 0: the other ranks only take part in training and sampling). ``overrides`` are the
    command line's, which validation checks against ``compare``."""
    validate_config(cfg, overrides)
    share_sweep_dir_with_ranks()
    store = Store(cfg.paths.store)
    task = build_task(cfg.task, store.root / "tasks" / cfg.task.name)
    check_task_data(task)  # every split, once, before any compute (and even when every stage is reused)
    ctx = StageContext(cfg, store, task)
    _ = ctx.tokenizer  # loaded once here, so a prompt format it cannot render is refused before any stage
    stages = cfg.pipeline.stages

    sft = SFT.run(ctx, {})
    if "reward" not in stages:
        return None
    reward = REWARD.run(ctx, {"sft": sft})
    if "generate" not in stages:
        return None
    offpolicy = GENERATE.run(ctx, {"sft": sft, "reward": reward})
    if "align" not in stages:
        return None
    upstream = {"sft": sft, "reward": reward}
    # Where the policy trains only its top layers, every method starts from the same frozen trunk.
    align_inputs = upstream | {"offpolicy": offpolicy} | frozen_trunk(ctx, sft, offpolicy)
    align = ALIGN_ON_TRUNK if "trunk" in align_inputs else ALIGN
    aligned = [
        (name, align.run(ctx.for_method(name, method, seed), align_inputs))
        for name, method in methods_to_align(cfg).items()
        for seed in method.seeds
    ]
    if "evaluate" not in stages:
        return None
    results = [PolicyResult.of("sft", EVALUATE.run(ctx, upstream | {"policy": sft}).record())]
    for name, policy in aligned:
        evaluation = EVALUATE.run(ctx, upstream | {"policy": policy})
        results.append(PolicyResult.of(name, evaluation.record(), policy))
    if not is_rank_zero():
        return None
    eval_cfg = cfg.stage.evaluate
    prompts = ctx.prompts("eval", eval_cfg.max_prompts, sft.context_length, eval_cfg.prompt_offset)
    out = Path(cfg.paths.results_dir)
    rows = write_report(
        results,
        prompts,
        out,
        cfg.seed,
        OmegaConf.to_container(cfg.contrasts),
        OmegaConf.to_container(cfg.claims),
        list(eval_cfg.best_of_n),
    )
    log.info("results written to %s", out)
    if cfg.logger.wandb:
        curves = [(f"{r.method} s{r.train_seed}" if r.train_seed else r.method, r.curve) for r in results]
        run_dir = log_wandb(
            rows,
            [(name, curve) for name, curve in curves if curve],
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
        return {"stage": "evaluate", "methods": ",".join(methods_to_align(cfg))}
    method = cfg.method
    return {
        "stage": "evaluate",
        "method": method.name,
        "beta": method.beta,
        "length_power": method.length_power,
    }
