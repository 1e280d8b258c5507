"""Stage 5: sample held-out prompts with one policy at temperature 1; proxy and gold reward, length and
KL(policy || SFT), each with its standard error over prompts. The SFT baseline also draws the pool that
best-of-n is picked from, and every policy may add a greedy table on a few prompts."""

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedModel

from directalign.artifacts import Evaluation
from directalign.distributed import is_rank_zero, map_sharded, rank_seed, shard, world
from directalign.errors import DataError
from directalign.estimates import sample_metrics
from directalign.generation import Draw, release_accelerator_memory, sampled_logratios
from directalign.prompt_cache import PromptCache, build_prompt_cache
from directalign.prompts import Prompts
from directalign.sampling import Sampling
from directalign.scoring import finite_mask
from directalign.stages.base import Stage
from directalign.stages.context import StageContext
from directalign.store import Artifact, Ranks
from directalign.trunk import shared_trunk_layer

# The reference's prompt cache of the last evaluation in this process, under the reference's artifact
# (its folder and manifest: a store rebuilt in the same place is another artifact), the layer and the
# prompts. A sweep evaluates its policies one after another on the same prompts, each against the same
# SFT model, so each evaluation after the first skips both models' passes over the prompts. Only an
# exact match is reused: a cache is the same tensors whether built now or earlier, so a policy's samples
# never depend on what the process evaluated before it.
_LAST_PROMPT_CACHE: dict[tuple, PromptCache] = {}


def reference_prompt_cache(
    artifact: Artifact,
    reference: PreTrainedModel,
    layer: int,
    prompt_ids: list[list[int]],
    pad_id: int,
    batch_size: int,
) -> PromptCache:
    """The ``PromptCache`` of ``prompt_ids`` at ``layer`` of ``reference`` (``artifact``, loaded): the last
    one built if it is of the same model, layer and prompts, else a new one in its place."""
    model_key = (str(artifact.path), json.dumps(artifact.manifest, sort_keys=True, default=str))
    key = (*model_key, layer, tuple(map(tuple, prompt_ids)), batch_size)
    if key not in _LAST_PROMPT_CACHE:
        _LAST_PROMPT_CACHE.clear()
        _LAST_PROMPT_CACHE[key] = build_prompt_cache(reference, prompt_ids, layer, pad_id, batch_size)
    return _LAST_PROMPT_CACHE[key]


def scored_records(
    ctx: StageContext, reward, prompts: Prompts, draws: list[list[Draw]], policy_ref: str, label: Any
) -> list[dict[str, Any]]:
    """One record per sample; a non-finite score is refused, as every policy must answer every prompt."""
    index = [(row, k) for row, group in enumerate(draws) for k in range(len(group))]
    completions = [draws[row][k][0] for row, k in index]
    texts = ctx.decode(completions)
    proxy, gold, _ = ctx.scorer(reward)(
        [prompts.sources[row] for row, _ in index], [prompts.references[row] for row, _ in index], texts
    )
    broken = np.flatnonzero(~finite_mask(proxy, gold))
    if broken.size:
        row = index[int(broken[0])][0]
        raise DataError(
            f"evaluate {policy_ref}: non-finite reward (proxy {proxy[broken[0]]},"
            f" gold {None if gold is None else gold[broken[0]]}) for row {row}"
            f" (id {prompts.example_ids[row]!r}) of split 'eval', and {broken.size - 1} more"
        )
    eos = ctx.tokenizer.eos_token_id
    return [
        {
            "id": prompts.example_ids[row],
            "sample": label if label is not None else k,
            "completion": text,
            "length_tokens": len(completion),
            "ended": bool(completion) and completion[-1] == eos,
            "proxy_reward": float(proxy[i]),
            "gold_reward": float(gold[i]) if gold is not None else None,
            "logratio": draws[row][k][1],
        }
        for i, ((row, k), completion, text) in enumerate(zip(index, completions, texts, strict=True))
    ]


def compute(ctx: StageContext, folder: Path, inputs: dict) -> dict:
    """Evaluate ``inputs["policy"]``: an aligned policy, or the SFT artifact itself for the baseline."""
    cfg, stage_cfg = ctx.cfg, ctx.cfg.stage.evaluate
    sft, reward, policy = inputs["sft"], inputs["reward"], inputs["policy"]
    seed = ctx.seed(4)
    prompts = ctx.prompts("eval", stage_cfg.max_prompts, policy.context_length, stage_cfg.prompt_offset)
    is_baseline = policy.ref == sft.ref
    model = policy.load(ctx.device)
    ref_model = None if is_baseline else sft.load(ctx.device)
    sampling = Sampling.of(cfg, "evaluate")
    n_samples = sampling.num_samples
    # A policy trained on the top layers shares its reference's trunk: the reference's prompt cache of
    # this rank's prompts (prompt_cache.py) serves it and every policy evaluated after it on them.
    layer = None if ref_model is None else shared_trunk_layer(model, ref_model)
    prompt_cache = None
    if layer is not None and stage_cfg.prompt_cache:
        own = [prompts.ids[i] for i in shard(len(prompts.ids), *world())]
        pad_id = ctx.tokenizer.pad_token_id
        prompt_cache = reference_prompt_cache(sft, ref_model, layer, own, pad_id, sampling.batch_size)

    def draw(draw_seed: int, prompt_ids: list[list[int]], options: dict[str, Any]) -> list[list[Draw]]:
        """Draws with ``options`` (``Sampling.options()`` or ``greedy()``), each rank drawing its share of
        the prompts."""

        def shard_draws(own: list[list[int]]) -> list[list[Draw]]:
            return sampled_logratios(
                model,
                ref_model,
                ctx.tokenizer,
                own,
                seed=rank_seed(draw_seed),
                prompt_cache=prompt_cache,
                **options,
            )

        return map_sharded(prompt_ids, shard_draws)

    # Every policy draws its samples with the same random numbers (seed), so differences are paired.
    sampled = draw(seed, prompts.ids, sampling.options())
    pool_size = max(stage_cfg.best_of_n, default=0) if is_baseline else 0
    if pool_size > n_samples:
        extra = draw(seed + 1, prompts.ids, replace(sampling, num_samples=pool_size - n_samples).options())
        sampled = [first + more for first, more in zip(sampled, extra, strict=True)]
    greedy_prompts = prompts.ids[: stage_cfg.greedy_prompts]
    greedy = draw(seed, greedy_prompts, sampling.greedy()) if greedy_prompts else []
    model = ref_model = None  # room on the GPU for the scorer
    release_accelerator_memory()
    if not is_rank_zero():
        return {}  # rank 0 scores and writes the samples
    records = scored_records(ctx, reward, prompts, sampled, policy.ref, None)
    greedy_records = scored_records(ctx, reward, prompts, greedy, policy.ref, "greedy") if greedy else []
    Evaluation.save(folder, records, greedy_records)
    has_gold = records[0]["gold_reward"] is not None
    own = [r for r in records if r["sample"] < n_samples]
    return sample_metrics(own, has_gold) | {
        "n_samples": n_samples,
        "temperature": sampling.temperature,
        "best_of_pool": pool_size if pool_size > n_samples else 0,
        "greedy": sample_metrics(greedy_records, has_gold) if greedy_records else None,
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
