"""Stage 3b: the frozen trunk's hidden states for every off-policy row (``trunk.py``).

When the aligned policy trains only layers ``L`` and up, the states entering ``L`` are the SFT model's:
computed here once, they serve every method's alignment, which then runs only the top layers. The
store key holds ``L`` (derived from the policy the align stage builds) and the precision the align
step runs under; the states are written inside ``compute``, so a killed computation leaves no manifest
and is redone.
"""

import logging
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from pathlib import Path

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from omegaconf import OmegaConf, open_dict
from transformers import AutoConfig, AutoModelForCausalLM

from directalign.artifacts import OffPolicyData, PolicyArtifact, TrunkStates
from directalign.models import with_lora
from directalign.stages.base import Stage
from directalign.stages.context import StageContext
from directalign.store import Ranks
from directalign.trunk import first_trained_layer, trunk_states

log = logging.getLogger(__name__)

PROMPTS_PER_FORWARD = 16
FULL_PRECISION, MIXED_PRECISION = ("32", "32-true"), ("16-mixed", "bf16-mixed")
# Strategies that run the model's own modules; FSDP's shards and weight casts would not match the cache.
UNSHARDED_STRATEGIES = ("auto", "ddp")


def forward_context(precision: str, device: torch.device) -> AbstractContextManager:
    """The autocast the Trainer runs the training step under, for a forward outside it."""
    if precision in MIXED_PRECISION:
        return MixedPrecision(precision, device.type).forward_context()
    return nullcontext()


def compute(ctx: StageContext, folder: Path, inputs: dict) -> dict:
    sft, offpolicy = inputs["sft"], inputs["offpolicy"]
    first_layer, table = ctx.cfg.trunk.first_layer, offpolicy.dataset()
    model = sft.load(ctx.device)
    with forward_context(str(ctx.cfg.trainer.precision), ctx.device):
        rows = trunk_states(
            model,
            table["prompt_ids"],
            table["completion_ids"],
            first_layer,
            ctx.tokenizer.pad_token_id,
            PROMPTS_PER_FORWARD,
        )
    sizes = TrunkStates.save(folder, rows)
    log.info("trunk: states entering layer %d, %.1f MB", first_layer, sizes["memory_bytes"] / 2**20)
    return {"first_layer": first_layer, "rows": len(rows), "tokens": sum(len(row) for row in rows), **sizes}


TRUNK = Stage(
    name="trunk",
    inputs=("sft", "offpolicy"),
    key=("trunk.first_layer", "trainer.precision"),
    output=TrunkStates,
    # One forward pass over the dataset and no collective: the other ranks wait for the manifest.
    ranks=Ranks.RANK_ZERO,
    compute=compute,
)


def align_first_layer(ctx: StageContext, sft: PolicyArtifact) -> int | None:
    """The first trained layer of the policy the align stage builds, if the align step can start there
    (``first_trained_layer``, on a weightless copy); None, with one log line saying why, if not."""
    cfg, stage_cfg = ctx.cfg, ctx.cfg.stage.align
    if not (stage_cfg.group_by_prompt and stage_cfg.frozen_trunk):
        log.info("trunk: not cached (stage.align.group_by_prompt and frozen_trunk must both be true)")
        return None
    precision, strategy = str(cfg.trainer.precision), OmegaConf.select(cfg, "trainer.strategy")
    if precision not in FULL_PRECISION + MIXED_PRECISION or strategy not in UNSHARDED_STRATEGIES:
        log.info(
            "trunk: not cached: it needs trainer.precision 32-true or *-mixed, trainer.strategy auto or ddp"
        )
        return None
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sft.model_dir))
    first_layer = first_trained_layer(with_lora(skeleton, stage_cfg.lora))
    if first_layer is None:
        log.info(
            "trunk: not cached: the layers below the adapters (or the whole model) train; every layer runs"
        )
    return first_layer


def frozen_trunk(ctx: StageContext, sft: PolicyArtifact, offpolicy: OffPolicyData) -> dict[str, TrunkStates]:
    """``{"trunk": states}`` to add to the align stage's inputs where the trunk cache applies, else ``{}``."""
    first_layer = align_first_layer(ctx, sft)
    if first_layer is None:
        return {}
    cfg = ctx.cfg.copy()
    with open_dict(cfg):
        cfg.trunk = {"first_layer": first_layer}
    return {"trunk": TRUNK.run(replace(ctx, cfg=cfg), {"sft": sft, "offpolicy": offpolicy})}
