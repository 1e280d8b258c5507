"""Stage 3: the off-policy dataset.

K completions per prompt sampled from the SFT policy, scored by the reward model (and the gold
judge), with the SFT (reference) log-prob of every completion token stored once, so alignment
never runs a reference model.
"""

import logging

import datasets
from transformers import AutoModelForCausalLM

from directalign.generation import sample_completions
from directalign.scoring import Scorer
from directalign.stages.context import StageContext, plain
from directalign.stages.reward import REWARD_DIR
from directalign.stages.sft import POLICY_DIR
from directalign.store import Artifact

log = logging.getLogger(__name__)

DATA_DIR = "data"


def run(ctx: StageContext, sft: Artifact, reward: Artifact) -> Artifact:
    cfg, stage_cfg = ctx.cfg, ctx.cfg.stage.generate
    config = {"task": ctx.task_key, "generate": plain(stage_cfg), "seed": cfg.seed}

    def compute(folder):
        seed = ctx.seed(2)
        tokenizer = ctx.tokenizer
        prompt_ids, examples, n_truncated = ctx.prompts("offpolicy", stage_cfg.max_prompts)
        policy = AutoModelForCausalLM.from_pretrained(sft.path / POLICY_DIR)
        per_prompt: list[list[list[int]]] = [[] for _ in prompt_ids]
        per_prompt_logps: list[list[list[float]]] = [[] for _ in prompt_ids]
        for i, temperature in enumerate(stage_cfg.temperatures):
            samples, sample_logps = sample_completions(
                policy,
                tokenizer,
                prompt_ids,
                num_samples=stage_cfg.num_completions,
                max_new_tokens=cfg.task.max_completion_tokens,
                batch_size=stage_cfg.batch_size,
                do_sample=True,
                temperature=temperature,
                top_p=stage_cfg.top_p,
                seed=seed + i,
                desc=f"off-policy samples (T={temperature})",
                return_logps=True,
            )
            for index in range(len(prompt_ids)):
                per_prompt[index].extend(samples[index])
                per_prompt_logps[index].extend(sample_logps[index])
        rows, n_empty = [], 0
        for index, completions in enumerate(per_prompt):
            texts = [tokenizer.decode(c, skip_special_tokens=True).strip() for c in completions]
            kept = [
                (c, t, lp) for c, t, lp in zip(completions, texts, per_prompt_logps[index], strict=True) if t
            ]
            n_empty += len(completions) - len(kept)
            if len(kept) >= 2:
                rows.append((index, kept))
        log.info("dropped %d empty completions; %d prompts keep >= 2 completions", n_empty, len(rows))
        flat_completions = [c for _, kept in rows for c, _, _ in kept]
        flat_texts = [t for _, kept in rows for _, t, _ in kept]
        # The SFT policy sampled these completions, so its sampling logits are the reference log-probs.
        ref_logps = [lp for _, kept in rows for _, _, lp in kept]
        flat_sources = [examples["source"][i] for i, kept in rows for _ in kept]
        flat_refs = [examples["reference"][i] for i, kept in rows for _ in kept]
        scorer = Scorer(reward.path / REWARD_DIR, cfg.stage.reward.max_length, ctx.task.gold_judge())
        proxy, gold = scorer(flat_sources, flat_refs, flat_texts)
        table, cursor = [], 0
        for index, kept in rows:
            span = slice(cursor, cursor + len(kept))
            cursor += len(kept)
            table.append(
                {
                    "id": examples["id"][index],
                    "source": examples["source"][index],
                    "reference": examples["reference"][index],
                    "prompt_ids": prompt_ids[index],
                    "completion_ids": flat_completions[span],
                    "completion_text": flat_texts[span],
                    "ref_logps": ref_logps[span],
                    "reward": proxy[span].tolist(),
                    "gold": gold[span].tolist() if gold is not None else None,
                }
            )
        datasets.Dataset.from_list(table).save_to_disk(folder / DATA_DIR)
        lengths = [len(c) for c in flat_completions]
        return {
            "n_prompts": len(table),
            "n_completions": len(flat_completions),
            "n_empty_dropped": n_empty,
            "n_truncated_sources": n_truncated,
            "mean_length_tokens": sum(lengths) / max(len(lengths), 1),
            "mean_reward": float(proxy.mean()),
            "mean_gold": float(gold.mean()) if gold is not None else None,
        }

    return ctx.store.run("generate", config, [sft, reward], compute)
