"""Stage 4: align one method (loss, beta, length_power) on the off-policy dataset. A fixed set of
held-out prompts is sampled and scored every few steps (the reward-vs-step curve). With a ``trunk``
input (``stages/trunk.py``) the align step runs only the trained top layers, on stored states."""

from dataclasses import replace
from functools import partial
from pathlib import Path

from torch.utils.data import DataLoader

from directalign.artifacts import AlignedPolicy
from directalign.errors import DataError
from directalign.lit.align import AlignModule
from directalign.lit.callbacks import RewardCurve
from directalign.losses import LOSSES
from directalign.models import with_lora
from directalign.pairs import (
    attach_trunk_states,
    build_pairs,
    build_prompt_groups,
    collate_pairs,
    collate_prompt_groups,
)
from directalign.sampling import Sampling
from directalign.stages.base import Stage
from directalign.stages.context import StageContext
from directalign.store import Ranks
from directalign.training import CHECKPOINT_DIR, fit_stage

# Training seed s of a method seeds its shuffle, LoRA init and dropout with seed + 3 + s * stride, far
# from the other stages' offsets (seed 0 keeps seed + 3).
TRAIN_SEED_STRIDE = 1000


def compute(ctx: StageContext, folder: Path, inputs: dict) -> dict:
    cfg, stage_cfg, method = ctx.cfg, ctx.cfg.stage.align, ctx.cfg.method
    sft, reward, offpolicy, trunk = inputs["sft"], inputs["reward"], inputs["offpolicy"], inputs.get("trunk")
    ctx.seed(3 + TRAIN_SEED_STRIDE * method.seed)
    # A ranked loss learns nothing from a tie; a loss on rewards reads the equal rewards.
    drop_ties = not LOSSES[method.loss].needs_rewards
    if stage_cfg.group_by_prompt:
        # Whole prompts a batch: each completion runs once, however many pairs it is in.
        items, n_ties = build_prompt_groups(offpolicy.dataset(), drop_ties)
        n_pairs = sum(len(group["pairs"]) for group in items)
        batch_size, collate = stage_cfg.prompts_per_batch, collate_prompt_groups
        if trunk is not None:
            attach_trunk_states(items, trunk.rows())
    else:
        items, n_ties = build_pairs(offpolicy.dataset(), drop_ties)
        n_pairs, batch_size, collate = len(items), stage_cfg.batch_size, collate_pairs
    if not n_pairs:
        raise DataError(
            f"align {method.name}: the off-policy dataset {offpolicy.path} yields no usable pairs"
        )
    # A plain batch_size (not a batch sampler): ExactResume skips a resumed epoch's trained batches.
    loader = DataLoader(
        items,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=partial(collate, pad_id=ctx.tokenizer.pad_token_id),
    )
    # curve_prompts 0: no curve (greedy decoding costs seconds a point whatever the number of prompts).
    # The curve decodes greedily with the evaluation's batch size and the task's budget.
    curve_sampling = Sampling.of(cfg, "evaluate")
    curves = (
        [
            RewardCurve(
                ctx.tokenizer,
                ctx.prompts("eval", stage_cfg.curve_prompts, sft.context_length),
                ctx.scorer(reward),
                stage_cfg.curve_every_n_steps,
                curve_sampling.max_new_tokens,
                curve_sampling.batch_size,
            )
        ]
        if stage_cfg.curve_prompts
        else []
    )

    # A later round continues the previous round's policy (saved merged): fresh adapters on its weights.
    start = inputs.get("init", sft)

    def build():
        return with_lora(start.load(), stage_cfg.lora)

    tags = {"stage": "align", "method": method.name, "beta": method.beta, "length_power": method.length_power}
    trainer, model = fit_stage(
        cfg,
        stage_cfg,
        folder,
        AlignModule(build(), stage_cfg, method, None if trunk is None else trunk.first_layer),
        build,
        f"align-{method.name}-b{method.beta}",
        tags,
        loader,
        callbacks=curves,
    )
    if model is not None:
        AlignedPolicy.save(folder, model, ctx.tokenizer)
        AlignedPolicy.save_curve(folder, curves[0].points if curves else [])
    return {
        "train_pairs": n_pairs,
        "n_ties": n_ties,
        "final_loss": float(trainer.callback_metrics["train/loss"]),
        "train_steps": trainer.global_step,
        "trunk_layer": None if trunk is None else trunk.first_layer,
    }


ALIGN = Stage(
    name="align",
    inputs=("sft", "reward", "offpolicy"),
    # The reward curve samples with the evaluation's batch size.
    key=("method", "stage.align", "stage.evaluate.sampling.batch_size", "seed", "trainer.precision"),
    # A method's name is a label; share_prompt and activation_checkpointing give the same loss and
    # gradients (test_prefix.py, test_checkpointing.py); the reference a later round's dataset stores is
    # in that dataset's key (round 1's is SFT whatever it says), and replay in the replayed dataset's.
    excluded=(
        "method.name",
        "method.reference",
        "stage.align.replay",
        "stage.align.share_prompt",
        "stage.align.activation_checkpointing",
        "stage.align.checkpoint_every_n_steps",
    ),
    output=AlignedPolicy,
    ranks=Ranks.COLLECTIVE,
    compute=compute,
    scratch=(CHECKPOINT_DIR,),
)

# Where the frozen-trunk cache applies: the same stage on the trunk's states (same loss and gradients,
# tests/test_trunk.py); the trunk is an input, so it is part of the store key.
ALIGN_ON_TRUNK = replace(ALIGN, inputs=(*ALIGN.inputs, "trunk"))


def align_stage(on_trunk: bool, continued: bool) -> Stage:
    """The align stage with the trunk's states as an input or not, and with ``init`` (the policy a later
    round continues) or not."""
    stage = ALIGN_ON_TRUNK if on_trunk else ALIGN
    return replace(stage, inputs=(*stage.inputs, "init")) if continued else stage
