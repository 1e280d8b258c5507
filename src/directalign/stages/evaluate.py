"""Stage 5: sample held-out prompts with one policy; proxy and gold reward, length, KL to SFT."""

from pathlib import Path

import numpy as np

from directalign.artifacts import Evaluation
from directalign.distributed import is_rank_zero, map_sharded, rank_seed, world
from directalign.errors import DataError
from directalign.generation import release_accelerator_memory, sample_completions
from directalign.logprobs import batched_completion_logps
from directalign.stages.base import Stage
from directalign.stages.context import StageContext
from directalign.store import Ranks
from directalign.validation import finite_mask


def compute(ctx: StageContext, folder: Path, inputs: dict) -> dict:
    """Evaluate ``inputs["policy"]``: an aligned policy, or the SFT artifact itself for the baseline."""
    cfg, stage_cfg = ctx.cfg, ctx.cfg.stage.evaluate
    sft, reward, policy = inputs["sft"], inputs["reward"], inputs["policy"]
    seed = ctx.seed(4)
    prompts = ctx.prompts("eval", stage_cfg.n_prompts, policy.context_length, stage_cfg.prompt_offset)
    model = policy.load(ctx.device)
    ref_model = None if policy.ref == sft.ref else sft.load(ctx.device)

    def sample_shard(shard: list[list[int]]) -> list[tuple[list[int], float]]:
        """One rank's prompts: the policy's completion and its log-ratio to the SFT policy."""
        samples, sample_logps = sample_completions(
            model,
            ctx.tokenizer,
            shard,
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
            ref_model, shard, completions, ctx.tokenizer.pad_token_id, stage_cfg.batch_size
        )
        rows = zip(completions, sample_logps, ref_logps, strict=True)
        return [(c, sum(policy_logps[0]) - sum(ref)) for c, policy_logps, ref in rows]

    sampled = map_sharded(prompts.ids, sample_shard)
    model = ref_model = None  # room on the GPU for the scorer
    release_accelerator_memory()
    if not is_rank_zero():
        return {}  # rank 0 scores and writes the samples
    completions = [completion for completion, _ in sampled]
    logratio = np.asarray([value for _, value in sampled])
    texts = ctx.decode(completions)
    proxy, gold = ctx.scorer(reward)(prompts.sources, prompts.references, texts)
    # Every policy is scored on the same prompts, so a sample cannot be dropped: refuse instead.
    broken = np.flatnonzero(~finite_mask(proxy, gold))
    if broken.size:
        row = int(broken[0])
        raise DataError(
            f"evaluate {policy.ref}: non-finite reward (proxy {proxy[row]},"
            f" gold {None if gold is None else gold[row]}) for row {row} (id {prompts.example_ids[row]!r})"
            f" of split 'eval', and {broken.size - 1} more"
        )
    lengths = np.asarray([len(c) for c in completions])
    Evaluation.save(
        folder,
        [
            {
                "id": prompts.example_ids[i],
                "completion": text,
                "length_tokens": int(lengths[i]),
                "proxy_reward": float(proxy[i]),
                "gold_reward": float(gold[i]) if gold is not None else None,
                "logratio": float(logratio[i]),
            }
            for i, text in enumerate(texts)
        ],
    )
    return {
        "proxy_reward": float(proxy.mean()),
        "gold_reward": float(gold.mean()) if gold is not None else None,
        "length_tokens": float(lengths.mean()),
        "kl_to_ref": float(logratio.mean()),
        "n_prompts": len(texts),
        "n_truncated_sources": prompts.n_truncated,
        "world_size": world()[1],
    }


EVALUATE = Stage(
    name="evaluate",
    inputs=("sft", "reward", "policy"),
    key=("task", "stage.evaluate", "seed"),
    output=Evaluation,
    ranks=Ranks.SHARDED,
    compute=compute,
)
