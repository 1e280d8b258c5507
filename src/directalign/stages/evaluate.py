"""Stage 5: sample held-out prompts with one policy; proxy and gold reward, length, KL to SFT."""

import json

import numpy as np
from transformers import AutoModelForCausalLM

from directalign.distributed import map_sharded, rank_seed, world
from directalign.generation import release_accelerator_memory, sample_completions
from directalign.logprobs import batched_completion_logps
from directalign.scoring import Scorer
from directalign.stages.context import StageContext, plain
from directalign.stages.reward import REWARD_DIR
from directalign.stages.sft import POLICY_DIR
from directalign.store import Artifact
from directalign.validation import DataError, check_prompt_lengths, finite_mask

SAMPLES_FILE = "samples.jsonl"


def run(ctx: StageContext, sft: Artifact, reward: Artifact, policy: Artifact) -> Artifact:
    """Evaluate the policy saved by ``policy`` (the SFT artifact itself for the baseline)."""
    cfg, stage_cfg = ctx.cfg, ctx.cfg.stage.evaluate
    config = {
        "task": ctx.task_key,
        "evaluate": plain(stage_cfg),
        "policy": f"{policy.stage}/{policy.key}",
        "seed": cfg.seed,
    }

    def compute(folder):
        seed = ctx.seed(4)
        tokenizer = ctx.tokenizer
        prompt_ids, examples, n_truncated = ctx.prompts("eval", stage_cfg.n_prompts, stage_cfg.prompt_offset)
        model = AutoModelForCausalLM.from_pretrained(policy.path / POLICY_DIR).to(ctx.device)
        check_prompt_lengths(
            f"task {cfg.task.name!r}, split 'eval'",
            prompt_ids,
            examples["id"],
            cfg.task.max_completion_tokens,
            getattr(model.config, "max_position_embeddings", None),
        )
        is_baseline = policy.key == sft.key and policy.stage == sft.stage
        ref_model = None
        if not is_baseline:
            ref_model = AutoModelForCausalLM.from_pretrained(sft.path / POLICY_DIR).to(ctx.device)

        def sample_shard(prompts: list[list[int]]) -> list[tuple[list[int], float]]:
            """One rank's prompts: the policy's completion and its log-ratio to the SFT policy."""
            samples, sample_logps = sample_completions(
                model,
                tokenizer,
                prompts,
                num_samples=1,
                max_new_tokens=cfg.task.max_completion_tokens,
                batch_size=stage_cfg.batch_size,
                do_sample=stage_cfg.do_sample,
                temperature=stage_cfg.temperature,
                top_p=stage_cfg.top_p,
                seed=rank_seed(seed),
                desc=f"evaluate {policy.stage}",
                return_logps=True,
            )
            completions = [s[0] for s in samples]
            if ref_model is None:
                return [(c, 0.0) for c in completions]
            ref_logps = batched_completion_logps(
                ref_model, prompts, completions, tokenizer.pad_token_id, stage_cfg.batch_size
            )
            rows = zip(completions, sample_logps, ref_logps, strict=True)
            return [(c, sum(policy_logps[0]) - sum(ref)) for c, policy_logps, ref in rows]

        sampled = map_sharded(prompt_ids, sample_shard)
        model = ref_model = None  # room on the GPU for the scorer
        release_accelerator_memory()
        if world()[0] != 0:
            return {}  # rank 0 scores and writes the samples
        completions = [completion for completion, _ in sampled]
        logratio = np.asarray([value for _, value in sampled])
        texts = [tokenizer.decode(c, skip_special_tokens=True).strip() for c in completions]
        scorer = Scorer(reward.path / REWARD_DIR, cfg.stage.reward.max_length, ctx.task.gold_judge())
        proxy, gold = scorer.to(ctx.device)(examples["source"], examples["reference"], texts)
        # Every policy is scored on the same prompts, so a sample cannot be dropped: refuse instead.
        broken = np.flatnonzero(~finite_mask(proxy, gold))
        if broken.size:
            row = int(broken[0])
            raise DataError(
                f"evaluate {policy.stage}/{policy.key}: non-finite reward (proxy {proxy[row]},"
                f" gold {None if gold is None else gold[row]}) for row {row} (id {examples['id'][row]!r})"
                f" of split 'eval', and {broken.size - 1} more"
            )
        lengths = np.asarray([len(c) for c in completions])
        with (folder / SAMPLES_FILE).open("w") as handle:
            for i, text in enumerate(texts):
                record = {
                    "id": examples["id"][i],
                    "completion": text,
                    "length_tokens": int(lengths[i]),
                    "proxy_reward": float(proxy[i]),
                    "gold_reward": float(gold[i]) if gold is not None else None,
                    "logratio": float(logratio[i]),
                }
                handle.write(json.dumps(record) + "\n")
        return {
            "proxy_reward": float(proxy.mean()),
            "gold_reward": float(gold.mean()) if gold is not None else None,
            "length_tokens": float(lengths.mean()),
            "kl_to_ref": float(logratio.mean()),
            "n_prompts": len(texts),
            "n_truncated_sources": n_truncated,
            "world_size": world()[1],
        }

    return ctx.store.run("evaluate", config, [sft, reward, policy], compute)


def load_samples(evaluation: Artifact) -> list[dict]:
    return [json.loads(line) for line in (evaluation.path / SAMPLES_FILE).read_text().splitlines()]
