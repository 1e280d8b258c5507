"""Stage 4: align one method (loss, beta, length_power) on the off-policy dataset. A fixed set of
held-out prompts is sampled and scored every few steps (the reward-vs-step curve)."""

from functools import partial
from pathlib import Path

from torch.utils.data import DataLoader

from directalign.artifacts import AlignedPolicy
from directalign.errors import DataError
from directalign.lit.align import AlignModule
from directalign.lit.callbacks import RewardCurve
from directalign.models import with_lora
from directalign.pairs import build_pairs, collate_pairs
from directalign.stages.base import Stage
from directalign.stages.context import StageContext
from directalign.store import Ranks
from directalign.training import CHECKPOINT_DIR, fit_stage


def compute(ctx: StageContext, folder: Path, inputs: dict) -> dict:
    cfg, stage_cfg, method = ctx.cfg, ctx.cfg.stage.align, ctx.cfg.method
    sft, reward, offpolicy = inputs["sft"], inputs["reward"], inputs["offpolicy"]
    ctx.seed(3)
    pairs, n_ties = build_pairs(offpolicy.dataset(), drop_ties=method.loss != "copg")
    if not pairs:
        raise DataError(
            f"align {method.name}: the off-policy dataset {offpolicy.path} yields no usable pairs"
        )
    loader = DataLoader(
        pairs,
        batch_size=stage_cfg.batch_size,
        shuffle=True,
        collate_fn=partial(collate_pairs, pad_id=ctx.tokenizer.pad_token_id),
    )
    curve = RewardCurve(
        ctx.tokenizer,
        ctx.prompts("eval", stage_cfg.curve_prompts, sft.context_length),
        ctx.scorer(reward),
        stage_cfg.curve_every_n_steps,
        cfg.task.max_completion_tokens,
        cfg.stage.evaluate.batch_size,
    )

    def build():
        return with_lora(sft.load(), stage_cfg.lora)

    tags = {"stage": "align", "method": method.name, "beta": method.beta, "length_power": method.length_power}
    trainer, model = fit_stage(
        cfg,
        stage_cfg,
        folder,
        AlignModule(build(), stage_cfg, method),
        build,
        f"align-{method.name}-b{method.beta}",
        tags,
        loader,
        callbacks=[curve],
    )
    if model is not None:
        AlignedPolicy.save(folder, model, ctx.tokenizer)
        AlignedPolicy.save_curve(folder, curve.points)
    return {
        "n_pairs": len(pairs),
        "n_ties": n_ties,
        "final_loss": float(trainer.callback_metrics["train/loss"]),
        "steps": trainer.global_step,
    }


ALIGN = Stage(
    name="align",
    inputs=("sft", "reward", "offpolicy"),
    # The reward curve samples with the evaluation's batch size.
    key=("method", "stage.align", "stage.evaluate.batch_size", "seed", "trainer.precision"),
    # A method's name is a label; share_prompt gives the same loss and gradients (test_prefix.py).
    excluded=(
        "method.name",
        "stage.align.share_prompt",
        "stage.align.checkpoint_every_n_steps",
    ),
    output=AlignedPolicy,
    ranks=Ranks.COLLECTIVE,
    compute=compute,
    scratch=(CHECKPOINT_DIR,),
)
