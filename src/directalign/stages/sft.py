"""Stage 1: fine-tune the policy on prompt -> human reference."""

from torch.utils.data import DataLoader

from directalign.lit.sft import SFTModule
from directalign.logprobs import collate_prompt_completion
from directalign.models import build_policy, merge_lora, with_lora
from directalign.prompts import completion_ids
from directalign.stages.context import StageContext, plain
from directalign.store import Artifact
from directalign.training import build_trainer, finish_wandb, resume_checkpoint, trained_model
from directalign.validation import check_prompt_lengths, check_task_data

POLICY_DIR = "model"


def run(ctx: StageContext) -> Artifact:
    """The fine-tuned policy. SFT is every pipeline's first stage, so it checks all of the task's
    splits here, once, before any compute (and even when every stage is reused)."""
    check_task_data(ctx.task)
    cfg, stage_cfg = ctx.cfg, ctx.cfg.stage.sft
    # The gold judge plays no part in SFT: changing it must not invalidate the policy.
    task_key = {k: v for k, v in ctx.task_key.items() if k != "gold"}
    config = {"task": task_key, "model": plain(cfg.model), "sft": plain(stage_cfg), "seed": cfg.seed}

    def compute(folder):
        seed = ctx.seed()
        tokenizer = ctx.tokenizer
        prompt_ids, examples, n_truncated = ctx.prompts("sft", stage_cfg.max_examples)
        completions = completion_ids(tokenizer, examples["reference"])
        limit = cfg.task.max_completion_tokens
        n_cut = sum(len(c) > limit for c in completions)
        completions = [c[:limit] for c in completions]
        pairs = list(zip(prompt_ids, completions, strict=True))
        loader = DataLoader(
            pairs,
            batch_size=stage_cfg.batch_size,
            shuffle=True,
            collate_fn=lambda rows: collate_prompt_completion(
                [p for p, _ in rows], [c for _, c in rows], tokenizer.pad_token_id
            ),
        )
        model = build_policy(cfg.model, ctx.store.root, len(tokenizer), seed)
        check_prompt_lengths(
            f"task {cfg.task.name!r}, split 'sft'",
            prompt_ids,
            examples["id"],
            cfg.task.max_completion_tokens,
            getattr(model.config, "max_position_embeddings", None),
        )
        model = with_lora(model, stage_cfg.lora)

        def rebuild():
            return with_lora(build_policy(cfg.model, ctx.store.root, len(tokenizer), seed), stage_cfg.lora)

        trainer = build_trainer(cfg, stage_cfg, folder, "sft", {"stage": "sft", "model": cfg.model.name})
        trainer.fit(
            SFTModule(model, stage_cfg), train_dataloaders=loader, ckpt_path=resume_checkpoint(folder)
        )
        finish_wandb(trainer)
        model = trained_model(trainer, model, rebuild)
        if trainer.is_global_zero:
            merge_lora(model).save_pretrained(folder / POLICY_DIR)
            tokenizer.save_pretrained(folder / POLICY_DIR)
        return {
            "train_loss": float(trainer.callback_metrics["train/loss"]),
            "n_examples": len(pairs),
            "n_truncated_sources": n_truncated,
            "n_truncated_completions": n_cut,
        }

    return ctx.store.run("sft", config, [], compute)
