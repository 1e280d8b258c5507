"""Stage 4: align one method (loss, beta, length_power) on the off-policy dataset."""

import json
import logging
from itertools import combinations
from typing import Any

import datasets
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from directalign.lit.align import AlignModule
from directalign.lit.callbacks import RewardCurve
from directalign.logprobs import collate_prompt_completion
from directalign.models import merge_lora, with_lora
from directalign.scoring import Scorer
from directalign.stages.context import StageContext, plain
from directalign.stages.generate import DATA_DIR
from directalign.stages.reward import REWARD_DIR
from directalign.stages.sft import POLICY_DIR
from directalign.store import Artifact
from directalign.training import build_trainer, finish_wandb, resume_checkpoint, trained_model

log = logging.getLogger(__name__)

CURVE_FILE = "reward_curve.json"
# Settings proven not to change the loss (tests/test_prefix.py): they stay out of the store key, so
# switching them never recomputes a policy.
SPEED_ONLY_KEYS = ("share_prompt",)


def build_pairs(table: datasets.Dataset, drop_ties: bool) -> tuple[list[dict[str, Any]], int]:
    """All pairs of completions of each prompt, ordered so that ``a`` has the higher reward.

    Preference losses need a strict order, so they drop ties; CoPG uses tied pairs too.
    """
    pairs, n_ties = [], 0
    for row in table:
        for i, j in combinations(range(len(row["completion_ids"])), 2):
            if row["reward"][i] == row["reward"][j]:
                n_ties += 1
                if drop_ties:
                    continue
            a, b = (i, j) if row["reward"][i] >= row["reward"][j] else (j, i)
            pairs.append(
                {
                    "prompt": row["prompt_ids"],
                    "a": row["completion_ids"][a],
                    "b": row["completion_ids"][b],
                    "ref_a": row["ref_logps"][a],
                    "ref_b": row["ref_logps"][b],
                    "reward_a": row["reward"][a],
                    "reward_b": row["reward"][b],
                }
            )
    return pairs, n_ties


def collate_pairs(pairs: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch of 2B sequences: the a completions first, then the b completions."""
    batch = collate_prompt_completion(
        [p["prompt"] for p in pairs] * 2, [p["a"] for p in pairs] + [p["b"] for p in pairs], pad_id
    )
    ref = torch.zeros(batch["completion_mask"].shape, dtype=torch.float32)
    for row, logps in enumerate([p["ref_a"] for p in pairs] + [p["ref_b"] for p in pairs]):
        ref[row, : len(logps)] = torch.tensor(logps)
    batch["ref_logps"] = ref
    batch["reward_a"] = torch.tensor([p["reward_a"] for p in pairs], dtype=torch.float32)
    batch["reward_b"] = torch.tensor([p["reward_b"] for p in pairs], dtype=torch.float32)
    return batch


def run(
    ctx: StageContext, sft: Artifact, reward: Artifact, generate: Artifact, method: DictConfig
) -> Artifact:
    cfg, stage_cfg = ctx.cfg, ctx.cfg.stage.align
    config = {
        "method": plain(method),
        "align": {k: v for k, v in plain(stage_cfg).items() if k not in SPEED_ONLY_KEYS},
        "seed": cfg.seed,
        "precision": cfg.trainer.precision,
    }

    def compute(folder):
        ctx.seed(3)
        tokenizer = ctx.tokenizer
        table = datasets.load_from_disk(str(generate.path / DATA_DIR))
        pairs, n_ties = build_pairs(table, drop_ties=method.loss != "copg")
        if not pairs:
            raise ValueError(f"align: the off-policy dataset {generate.path} yields no usable pairs")
        loader = DataLoader(
            pairs,
            batch_size=stage_cfg.batch_size,
            shuffle=True,
            collate_fn=lambda rows: collate_pairs(rows, tokenizer.pad_token_id),
        )
        curve_ids, curve_examples, _ = ctx.prompts("eval", stage_cfg.curve_prompts)
        curve = RewardCurve(
            tokenizer,
            curve_ids,
            curve_examples["source"],
            curve_examples["reference"],
            Scorer(reward.path / REWARD_DIR, cfg.stage.reward.max_length, ctx.task.gold_judge()),
            stage_cfg.curve_every_n_steps,
            cfg.task.max_completion_tokens,
            cfg.stage.evaluate.batch_size,
        )

        def build():
            return with_lora(AutoModelForCausalLM.from_pretrained(sft.path / POLICY_DIR), stage_cfg.lora)

        model = build()
        tags = {
            "stage": "align",
            "method": method.name,
            "beta": method.beta,
            "length_power": method.length_power,
        }
        trainer = build_trainer(cfg, stage_cfg, folder, f"align-{method.name}-b{method.beta}", tags, [curve])
        trainer.fit(
            AlignModule(model, stage_cfg, method),
            train_dataloaders=loader,
            ckpt_path=resume_checkpoint(folder),
        )
        final_loss = float(trainer.callback_metrics["train/loss"])
        finish_wandb(trainer)
        model = trained_model(trainer, model, build)
        if trainer.is_global_zero:
            merge_lora(model).save_pretrained(folder / POLICY_DIR)
            tokenizer.save_pretrained(folder / POLICY_DIR)
            (folder / CURVE_FILE).write_text(json.dumps(curve.points, indent=2))
        return {
            "n_pairs": len(pairs),
            "n_ties": n_ties,
            "final_loss": final_loss,
            "steps": trainer.global_step,
        }

    return ctx.store.run("align", config, [sft, reward, generate], compute)
