"""Stage 3: the off-policy dataset.

K completions per prompt sampled from the SFT policy, scored by the reward model (and the gold
judge), with the SFT (reference) log-prob of every completion token stored once, so alignment
never runs a reference model.
"""

import logging
import shutil
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import datasets
import numpy as np
from transformers import AutoConfig, AutoModelForCausalLM

from directalign.distributed import map_sharded, rank_seed, world
from directalign.generation import release_accelerator_memory, sample_completions
from directalign.scoring import Scorer
from directalign.stages.context import StageContext, plain
from directalign.stages.reward import REWARD_DIR
from directalign.stages.sft import POLICY_DIR
from directalign.store import Artifact
from directalign.validation import DataError, check_prompt_lengths, finite_mask

log = logging.getLogger(__name__)

DATA_DIR = "data"


def run(ctx: StageContext, sft: Artifact, reward: Artifact) -> Artifact:
    cfg, stage_cfg = ctx.cfg, ctx.cfg.stage.generate
    config = {"task": ctx.task_key, "generate": plain(stage_cfg), "seed": cfg.seed}

    def compute(folder):
        seed = ctx.seed(2)
        tokenizer = ctx.tokenizer
        prompt_ids, examples, n_truncated = ctx.prompts("offpolicy", stage_cfg.max_prompts)
        check_prompt_lengths(
            f"task {cfg.task.name!r}, split 'offpolicy'",
            prompt_ids,
            examples["id"],
            cfg.task.max_completion_tokens,
            getattr(AutoConfig.from_pretrained(sft.path / POLICY_DIR), "max_position_embeddings", None),
        )
        sampler = _sampler(ctx, sft.path / POLICY_DIR, seed)
        start = time.perf_counter()
        sampled = map_sharded(prompt_ids, partial(_sample_all_temperatures, sampler, stage_cfg.temperatures))
        seconds = time.perf_counter() - start
        del sampler  # the sampling engine's memory goes back before scoring (and alignment)
        release_accelerator_memory()
        if world()[0] != 0:
            return {}  # rank 0 scores and writes the dataset
        per_prompt = [completions for completions, _ in sampled]
        per_prompt_logps = [logps for _, logps in sampled]
        n_generated = sum(len(c) for group in per_prompt for c in group)
        log.info(
            "sampled %d tokens in %.1f s: %.1f tokens/s (%s backend, %d rank(s))",
            n_generated,
            seconds,
            n_generated / seconds,
            stage_cfg.backend,
            world()[1],
        )
        # Empty completions are dropped before scoring, non-finite scores after it; a prompt needs two
        # completions left to form a pair. Each drop is counted in the manifest.
        texts = [
            [tokenizer.decode(c, skip_special_tokens=True).strip() for c in group] for group in per_prompt
        ]
        candidates = [(index, k) for index, group in enumerate(texts) for k, text in enumerate(group) if text]
        n_empty = sum(len(group) for group in per_prompt) - len(candidates)
        if not candidates:
            raise DataError("generate: every completion sampled for split 'offpolicy' is empty")
        scorer = Scorer(reward.path / REWARD_DIR, cfg.stage.reward.max_length, ctx.task.gold_judge())
        proxy, gold = scorer.to(ctx.device)(
            [examples["source"][i] for i, _ in candidates],
            [examples["reference"][i] for i, _ in candidates],
            [texts[i][k] for i, k in candidates],
        )
        finite = finite_mask(proxy, gold)
        n_nonfinite = int((~finite).sum())
        kept: dict[int, list[int]] = {}
        for position, (index, _) in enumerate(candidates):
            if finite[position]:
                kept.setdefault(index, []).append(position)
        rows = [(index, positions) for index, positions in kept.items() if len(positions) >= 2]
        n_alone = sum(len(positions) for positions in kept.values() if len(positions) < 2)
        log.info(
            "dropped %d empty and %d non-finite-reward completions; %d of %d prompts keep >= 2 completions",
            n_empty,
            n_nonfinite,
            len(rows),
            len(prompt_ids),
        )
        table = []
        for index, positions in rows:
            picks = [candidates[p][1] for p in positions]
            table.append(
                {
                    "id": examples["id"][index],
                    "source": examples["source"][index],
                    "reference": examples["reference"][index],
                    "prompt_ids": prompt_ids[index],
                    "completion_ids": [per_prompt[index][k] for k in picks],
                    "completion_text": [texts[index][k] for k in picks],
                    # The SFT policy sampled these completions: its sampling logits are the reference.
                    "ref_logps": [per_prompt_logps[index][k] for k in picks],
                    "reward": proxy[positions].tolist(),
                    "gold": gold[positions].tolist() if gold is not None else None,
                }
            )
        if not table:
            raise DataError(
                f"generate: no prompt of split 'offpolicy' kept 2 completions ({n_empty} empty,"
                f" {n_nonfinite} with a non-finite reward)"
            )
        shutil.rmtree(folder / DATA_DIR, ignore_errors=True)
        datasets.Dataset.from_list(table).save_to_disk(folder / DATA_DIR)
        lengths = [len(c) for row in table for c in row["completion_ids"]]
        rewards = [r for row in table for r in row["reward"]]
        golds = [g for row in table for g in row["gold"]] if gold is not None else None
        return {
            "n_prompts": len(table),
            "n_completions": len(lengths),
            "n_empty_dropped": n_empty,
            "n_nonfinite_dropped": n_nonfinite,
            "n_unpaired_dropped": n_alone,
            "n_truncated_sources": n_truncated,
            "mean_length_tokens": float(np.mean(lengths)),
            "mean_reward": float(np.mean(rewards)),
            "mean_gold": float(np.mean(golds)) if golds is not None else None,
            "generated_tokens": n_generated,
            "sampling_seconds": seconds,
            "tokens_per_s": n_generated / seconds,
            "world_size": world()[1],
        }

    return ctx.store.run("generate", config, [sft, reward], compute)


Sampler = Callable[[list[list[int]], float, int], tuple[list, list]]


def _sample_all_temperatures(
    sample: Sampler, temperatures: list[float], prompts: list[list[int]]
) -> list[tuple[list[list[int]], list[list[float]]]]:
    """Every temperature's completions (and their sampling log-probs) for one rank's prompts."""
    shard = [([], []) for _ in prompts]
    for i, temperature in enumerate(temperatures):
        samples, sample_logps = sample(prompts, temperature, i)
        for (completions, logps), new, new_logps in zip(shard, samples, sample_logps, strict=True):
            completions.extend(new)
            logps.extend(new_logps)
    return shard


def _sampler(ctx: StageContext, policy_dir: Path, seed: int) -> Sampler:
    """``sample(prompts, temperature, round)`` with the configured backend over the SFT policy:
    completions and their per-token log-probs; ``round`` numbers the temperatures."""
    cfg = ctx.cfg
    common = {
        "num_samples": cfg.stage.generate.num_completions,
        "max_new_tokens": cfg.task.max_completion_tokens,
        "top_p": cfg.stage.generate.top_p,
    }
    if cfg.stage.generate.backend == "vllm":
        from directalign.generation_vllm import VllmSampler  # vLLM is imported only when chosen

        engine = VllmSampler(policy_dir, ctx.tokenizer.eos_token_id, seed)
        return lambda prompts, temperature, _: engine(prompts, temperature=temperature, **common)
    policy = AutoModelForCausalLM.from_pretrained(policy_dir).to(ctx.device)

    def sample(prompts: list[list[int]], temperature: float, round: int) -> tuple[list, list]:
        return sample_completions(
            policy,
            ctx.tokenizer,
            prompts,
            batch_size=cfg.stage.generate.batch_size,
            do_sample=True,
            temperature=temperature,
            seed=rank_seed(seed + round),
            desc=f"off-policy samples (T={temperature})",
            return_logps=True,
            **common,
        )

    return sample
