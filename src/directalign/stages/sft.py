"""Stage 1: fine-tune the policy on prompt -> human reference (loss on completion tokens only)."""

from functools import partial
from pathlib import Path

from torch.utils.data import DataLoader

from directalign.artifacts import PolicyArtifact
from directalign.lit.sft import SFTModule
from directalign.logprobs import collate_prompt_completion
from directalign.models import build_policy, with_lora
from directalign.prompts import completion_ids
from directalign.stages.base import Stage
from directalign.stages.context import StageContext
from directalign.store import Ranks
from directalign.training import CHECKPOINT_DIR, fit_stage


def collate_examples(rows: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    return collate_prompt_completion([prompt for prompt, _ in rows], [c for _, c in rows], pad_id)


def compute(ctx: StageContext, folder: Path, inputs: dict) -> dict:
    cfg, stage_cfg = ctx.cfg, ctx.cfg.stage.sft
    seed = ctx.seed()
    tokenizer = ctx.tokenizer

    def build():
        return with_lora(build_policy(cfg.model, ctx.store.root, len(tokenizer), seed), stage_cfg.lora)

    model = build()
    positions = getattr(model.config, "max_position_embeddings", None)
    prompts = ctx.prompts("sft", stage_cfg.max_prompts, positions)
    limit = cfg.task.max_completion_tokens
    completions = completion_ids(tokenizer, prompts.references)
    examples = [(prompt, c[:limit]) for prompt, c in zip(prompts.ids, completions, strict=True)]
    loader = DataLoader(
        examples,
        batch_size=stage_cfg.batch_size,
        shuffle=True,
        collate_fn=partial(collate_examples, pad_id=tokenizer.pad_token_id),
    )
    tags = {"stage": "sft", "model": cfg.model.name}
    trainer, model = fit_stage(
        cfg, stage_cfg, folder, SFTModule(model, stage_cfg), build, "sft", tags, loader
    )
    if model is not None:
        PolicyArtifact.save(folder, model, tokenizer)
    return {
        "train_loss": float(trainer.callback_metrics["train/loss"]),
        "n_examples": len(examples),
        "n_truncated_sources": prompts.n_truncated,
        "n_truncated_completions": sum(len(c) > limit for c in completions),
    }


SFT = Stage(
    name="sft",
    inputs=(),
    key=("task", "model", "stage.sft", "seed", "trainer.precision"),
    # The gold judge plays no part in SFT; checkpoint frequency never changes a result (test_resume.py).
    excluded=("task.gold", "stage.sft.checkpoint_every_n_steps"),
    output=PolicyArtifact,
    ranks=Ranks.COLLECTIVE,
    compute=compute,
    scratch=(CHECKPOINT_DIR,),
)
