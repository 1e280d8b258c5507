"""Run the stages of ``cfg.pipeline`` in order, reusing every completed artifact of the store.

Under data-parallel training every rank runs this same function (Lightning's launcher, torchrun
or SLURM starts them): the store keeps the ranks in step, and only rank 0 writes results and logs.
"""

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from directalign.artifacts import AlignedPolicy, OffPolicyData
from directalign.distributed import is_rank_zero
from directalign.errors import ConfigError
from directalign.report import PolicyResult, log_wandb, write_report
from directalign.stages import EVALUATE, GENERATE, GENERATE_ROUND, REWARD, SFT
from directalign.stages.align import align_stage
from directalign.stages.context import StageContext
from directalign.stages.replay import REPLAY
from directalign.stages.trunk import frozen_trunk
from directalign.store import Artifact, Store
from directalign.tasks import build_task
from directalign.tasks.base import Task
from directalign.training import share_sweep_dir_with_ranks, wandb_run_args
from directalign.validation import check_task_data, validate_config

log = logging.getLogger(__name__)


def methods_to_align(cfg: DictConfig) -> dict[str, DictConfig]:
    """The methods to align by name: those of ``compare``, each named by its key, when it is set; else
    the single ``method`` under its own name."""
    return dict(cfg.compare.items()) if cfg.compare else {cfg.method.name: cfg.method}


def prompts_per_round(cfg: DictConfig, task: Task) -> int:
    """Each round's share of the off-policy prompts (``stage.generate.max_prompts``, or the whole split)."""
    available, limit = len(task.examples("offpolicy")), cfg.stage.generate.max_prompts
    total = available if limit is None else min(limit, available)
    if total < cfg.pipeline.rounds:
        raise ConfigError(
            f"pipeline.rounds={cfg.pipeline.rounds} needs at least one off-policy prompt a round, and"
            f" there are {total}"
        )
    return total // cfg.pipeline.rounds


def round_context(ctx: StageContext, index: int, per_round: int) -> StageContext:
    """``ctx`` for round ``index`` of several: its generate stage draws ``per_round`` prompts, from
    ``(index - 1) x per_round`` on; a later round's config names the round (``round``: its index and
    offset), which its dataset's store key holds."""
    cfg = ctx.cfg.copy()
    with open_dict(cfg):
        cfg.stage.generate.max_prompts = per_round
        if index > 1:
            cfg.round = {"index": index, "prompt_offset": (index - 1) * per_round}
    return replace(ctx, cfg=cfg)


def later_rounds(
    ctx: StageContext,
    upstream: dict[str, Artifact],
    name: str,
    policy: AlignedPolicy,
    offpolicy: OffPolicyData,
) -> list[tuple[str, int, AlignedPolicy]]:
    """Round 1's ``policy`` of one method and seed (``ctx``, round 1's; trained on ``offpolicy``) and
    those of rounds 2 .. ``pipeline.rounds``, each continuing the one before it on its own slice's
    samples (and, with ``stage.align.replay``, on every earlier round's). The slice is sampled by the
    previous round's policy, or with ``pipeline.round_sampler=sft`` by SFT: offline training in the same
    rounds, the control that isolates what sampling from the policy adds. Every round but the last is
    named ``<name>_round<r>``; the last keeps ``name``. Returns (name, round, policy) a round."""
    rounds, replay = ctx.cfg.pipeline.rounds, ctx.cfg.stage.align.replay
    per_round = ctx.cfg.stage.generate.max_prompts
    from_sft = ctx.cfg.pipeline.round_sampler == "sft"
    policies, training = [policy], offpolicy
    for index in range(2, rounds + 1):
        round_ctx = round_context(ctx, index, per_round)
        sampler = upstream["sft"] if from_sft else policies[-1]
        latest = GENERATE_ROUND.run(round_ctx, upstream | {"policy": sampler})
        training = REPLAY.run(round_ctx, {"earlier": training, "latest": latest}) if replay else latest
        inputs = upstream | {"offpolicy": training, "init": policies[-1]}
        inputs |= frozen_trunk(round_ctx, upstream["sft"], training)
        policies.append(align_stage("trunk" in inputs, True).run(round_ctx, inputs))
    names = [f"{name}_round{index}" for index in range(1, rounds)] + [name]
    return [(names[index], index + 1, policy) for index, policy in enumerate(policies)]


def run_pipeline(cfg: DictConfig, overrides: Sequence[str] = ()) -> list[dict] | None:
    """All stages up to the last one named in ``cfg.pipeline.stages``; returns the summary rows
    (on rank 0: the other ranks only take part in training and sampling). ``overrides`` are the
    command line's, which validation checks against ``compare``."""
    validate_config(cfg, overrides)
    share_sweep_dir_with_ranks()
    store = Store(cfg.paths.store)
    task = build_task(cfg.task, store.root / "tasks" / cfg.task.name)
    check_task_data(task)  # every split, once, before any compute (and even when every stage is reused)
    rounds = cfg.pipeline.rounds
    per_round = prompts_per_round(cfg, task) if rounds > 1 else None  # refused here, before any stage
    ctx = StageContext(cfg, store, task)
    _ = ctx.tokenizer  # loaded once here, so a prompt format it cannot render is refused before any stage
    stages = cfg.pipeline.stages

    sft = SFT.run(ctx, {})
    if "reward" not in stages:
        return None
    reward = REWARD.run(ctx, {"sft": sft})
    if "generate" not in stages:
        return None
    first = round_context(ctx, 1, per_round) if per_round else ctx
    offpolicy = GENERATE.run(first, {"sft": sft, "reward": reward})
    if "align" not in stages:
        return None
    upstream = {"sft": sft, "reward": reward}
    # Where the policy trains only its top layers, every method starts from the same frozen trunk.
    align_inputs = upstream | {"offpolicy": offpolicy} | frozen_trunk(first, sft, offpolicy)
    aligned = []
    for name, method in methods_to_align(cfg).items():
        for seed in method.seeds:
            method_ctx = first.for_method(name, method, seed)
            policy = align_stage("trunk" in align_inputs, False).run(method_ctx, align_inputs)
            aligned.extend(later_rounds(method_ctx, upstream, name, policy, offpolicy))
    if "evaluate" not in stages:
        return None
    results = [PolicyResult.of("sft", EVALUATE.run(ctx, upstream | {"policy": sft}).record())]
    for name, index, policy in aligned:
        evaluation = EVALUATE.run(ctx, upstream | {"policy": policy})
        results.append(PolicyResult.of(name, evaluation.record(), policy))
        if rounds > 1:
            results[-1].round = {"index": index, "sampler": cfg.pipeline.round_sampler}
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
