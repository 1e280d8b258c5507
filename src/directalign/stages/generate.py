"""Stage 3: the off-policy dataset.

K completions per prompt sampled from the SFT policy, scored by the calibrated reward model (and the
gold judge), with the SFT (reference) log-prob of every completion token stored once, so alignment never
runs a reference model. Under ``pipeline.rounds`` > 1 each later round draws its own slice of the
off-policy prompts (``GENERATE_ROUND``) from the previous round's policy, or from SFT with
``pipeline.round_sampler=sft`` (offline rounds); the stored reference is the SFT model's log-probs of
those samples (``method.reference=sft``) or the sampling policy's own (``previous``).
``reward_source=gold`` trains on the labeller's own logits instead (an oracle arm, with the labeller's
length bias where the task sets one). Empty completions and non-finite rewards are dropped and counted;
a prompt needs two completions left to form a pair.
"""

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from directalign.artifacts import OffPolicyData, PolicyArtifact, RewardArtifact
from directalign.distributed import is_rank_zero, map_sharded, rank_seed, world
from directalign.errors import DataError
from directalign.generation import release_accelerator_memory, sample_completions, sample_with_reference
from directalign.logprobs import batched_completion_logps
from directalign.offpolicy_stats import dataset_statistics
from directalign.preferences import labeller_scores
from directalign.sampling import Sampling
from directalign.scoring import finite_mask
from directalign.stages.base import Stage
from directalign.stages.context import Prompts, StageContext
from directalign.store import Ranks

log = logging.getLogger(__name__)

# sample(prompts) -> (completions, their per-token log-probs) for each of one rank's prompts.
Sampler = Callable[[list[list[int]]], tuple[list, list]]
Group = tuple[list[list[int]], list[list[float]]]  # one prompt's completions and their log-probs


# Round r's sampling seed is the stage's seed plus (r - 1) x this, so round 1 keeps the stage's own.
ROUND_SEED_STRIDE = 1000


def sampler(
    ctx: StageContext, policy: PolicyArtifact, seed: int, reference: PolicyArtifact | None = None
) -> Sampler:
    """The configured backend over ``policy`` (SFT, or a later round's policy), drawing
    ``stage.generate.sampling``; the log-probs it returns are the policy's own, or with ``reference``
    (hf backend) that model's, computed as the evaluation computes KL: on a policy trained on the top
    layers only the reference's top layers run, on the states the policy recorded while sampling."""
    sampling = Sampling.of(ctx.cfg, "generate")
    if ctx.cfg.stage.generate.backend == "vllm":
        from directalign.generation_vllm import VllmSampler  # vLLM is imported only when chosen

        engine = VllmSampler(policy.model_dir, ctx.tokenizer.eos_token_id, seed)
        return lambda prompts: engine(
            prompts,
            num_samples=sampling.num_samples,
            max_new_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
        )
    model = policy.load(ctx.device)
    desc = f"off-policy samples (T={sampling.temperature})"
    if reference is not None:
        ref_model = reference.load(ctx.device)

        def sample_scored(prompts: list[list[int]]) -> tuple[list, list]:
            options = sampling.options() | {"seed": rank_seed(seed), "desc": desc}
            samples, _, ref_logps = sample_with_reference(model, ref_model, ctx.tokenizer, prompts, **options)
            return samples, ref_logps

        return sample_scored

    def sample(prompts: list[list[int]]) -> tuple[list, list]:
        return sample_completions(
            model,
            ctx.tokenizer,
            prompts,
            seed=rank_seed(seed),
            desc=desc,
            return_logps=True,
            **sampling.options(),
        )

    return sample


def sample_groups(sample: Sampler, prompts: list[list[int]]) -> list[Group]:
    """One rank's prompts' completions with their sampling log-probs, a group a prompt."""
    samples, sample_logps = sample(prompts)
    return list(zip(samples, sample_logps, strict=True))


def scored_rows(
    ctx: StageContext, reward: RewardArtifact, prompts: Prompts, groups: list[Group]
) -> tuple[list[dict], dict[str, int]]:
    """One dataset row per prompt that keeps >= 2 completions after dropping empty texts (before
    scoring) and non-finite rewards (after), and the count of each drop."""
    texts = [ctx.decode(completions) for completions, _ in groups]
    candidates = [(index, k) for index, group in enumerate(texts) for k, text in enumerate(group) if text]
    n_empty = sum(len(group) for group in texts) - len(candidates)
    if not candidates:
        raise DataError("generate: every completion sampled for split 'offpolicy' is empty")
    completions = [texts[i][k] for i, k in candidates]
    proxy, gold, raw_proxy = ctx.scorer(reward)(
        [prompts.sources[i] for i, _ in candidates],
        [prompts.references[i] for i, _ in candidates],
        completions,
    )
    finite = finite_mask(proxy, gold)
    if ctx.cfg.stage.generate.reward_source == "gold":
        # The oracle arm: the labeller's own Bradley-Terry logits (its length bias included), free of the
        # reward model's errors; the dataset's gold column stays the unbiased judge's.
        labeller = labeller_scores(gold, completions, ctx.task.label_length_bias())
        rewards = labeller / ctx.cfg.stage.reward.label_temperature
    else:
        rewards = proxy
    kept: dict[int, list[int]] = {}
    for position, (index, _) in enumerate(candidates):
        if finite[position]:
            kept.setdefault(index, []).append(position)
    counts = {
        "n_empty_dropped": n_empty,
        "n_nonfinite_dropped": int((~finite).sum()),
        "n_unpaired_dropped": sum(len(positions) for positions in kept.values() if len(positions) < 2),
    }
    rows = []
    for index, positions in kept.items():
        if len(positions) < 2:
            continue
        picks = [candidates[p][1] for p in positions]
        completions, logps = groups[index]
        rows.append(
            {
                "id": prompts.example_ids[index],
                "source": prompts.sources[index],
                "reference": prompts.references[index],
                "prompt_ids": prompts.ids[index],
                "completion_ids": [completions[k] for k in picks],
                "completion_text": [texts[index][k] for k in picks],
                # The reference's per-token log-probs (the sampling policy's own where it is the reference).
                "ref_logps": [logps[k] for k in picks],
                "reward": rewards[positions].tolist(),
                "proxy": proxy[positions].tolist(),
                "raw_proxy": raw_proxy[positions].tolist(),
                "gold": gold[positions].tolist() if gold is not None else None,
            }
        )
    log.info("dropped %s; %d of %d prompts keep >= 2 completions", counts, len(rows), len(prompts))
    if not rows:
        raise DataError(
            f"generate: no prompt of split 'offpolicy' kept 2 completions ({counts['n_empty_dropped']} empty,"
            f" {counts['n_nonfinite_dropped']} with a non-finite reward)"
        )
    return rows, counts


def sft_reference(
    ctx: StageContext, sft: PolicyArtifact, prompts: Prompts, groups: list[Group]
) -> list[Group]:
    """``groups`` with their log-probs replaced by the SFT model's per-token log-probs of the same
    completions: the reference of a later round's samples when ``method.reference`` is sft."""
    flat = [
        (index, completion) for index, (completions, _) in enumerate(groups) for completion in completions
    ]
    logps = batched_completion_logps(
        sft.load(ctx.device),
        [prompts.ids[index] for index, _ in flat],
        [completion for _, completion in flat],
        ctx.tokenizer.pad_token_id,
        ctx.cfg.stage.generate.sampling.batch_size,
    )
    rescored: list[Group] = [([], []) for _ in groups]
    for (index, completion), completion_logps in zip(flat, logps, strict=True):
        rescored[index][0].append(completion)
        rescored[index][1].append(completion_logps)
    return rescored


def compute(ctx: StageContext, folder: Path, inputs: dict) -> dict:
    """Round 1 samples the SFT policy; a later round (``inputs["policy"]``, ``ctx.cfg.round``) the
    previous round's policy or SFT, on its own slice of the prompts."""
    stage_cfg, sft, reward = ctx.cfg.stage.generate, inputs["sft"], inputs["reward"]
    policy, round_cfg = inputs.get("policy", sft), ctx.cfg.get("round")
    seed = ctx.seed(2 + ROUND_SEED_STRIDE * (round_cfg.index - 1 if round_cfg else 0))
    offset = round_cfg.prompt_offset if round_cfg else 0
    prompts = ctx.prompts("offpolicy", stage_cfg.max_prompts, sft.context_length, offset)
    # A later round's samples need SFT's log-probs when SFT is the reference: scored while sampling where
    # the backend allows (hf), else by a pass of the whole SFT model afterwards (sft_reference).
    rescore = policy is not sft and ctx.cfg.method.reference == "sft"
    scored_while_sampling = rescore and stage_cfg.backend == "hf"
    sample = sampler(ctx, policy, seed, sft if scored_while_sampling else None)
    start = time.perf_counter()
    groups = map_sharded(prompts.ids, partial(sample_groups, sample))
    seconds = time.perf_counter() - start
    del sample  # the sampling engine's memory goes back before scoring (and alignment)
    release_accelerator_memory()
    if not is_rank_zero():
        return {}  # rank 0 scores and writes the dataset
    if rescore and not scored_while_sampling:
        groups = sft_reference(ctx, sft, prompts, groups)
    n_generated = sum(len(c) for completions, _ in groups for c in completions)
    log.info(
        "sampled %d tokens in %.1f s: %.1f tokens/s (%s backend, %d rank(s))",
        *(n_generated, seconds, n_generated / seconds, stage_cfg.backend, world()[1]),
    )
    rows, counts = scored_rows(ctx, reward, prompts, groups)
    OffPolicyData.save(folder, rows)
    return (
        counts
        | dataset_statistics(rows, ctx.tokenizer.eos_token_id)
        | {
            "reward_source": stage_cfg.reward_source,
            "calibration_scale": reward.calibration_scale,
            "n_truncated_sources": prompts.n_truncated,
            "generated_tokens": n_generated,
            "sampling_seconds": seconds,
            "tokens_per_s": n_generated / seconds,
            "world_size": world()[1],
        }
    )


GENERATE = Stage(
    name="generate",
    inputs=("sft", "reward"),
    key=("task", "stage.generate", "seed"),
    output=OffPolicyData,
    ranks=Ranks.SHARDED,
    compute=compute,
)

# A later round's dataset: sampled by the previous round's policy or SFT (an input, so its whole history
# is in the key), on the prompts of ``round`` (its index and offset), with ``method.reference``'s log-probs.
GENERATE_ROUND = Stage(
    name="generate",
    inputs=("sft", "reward", "policy"),
    key=("task", "stage.generate", "seed", "round", "method.reference"),
    output=OffPolicyData,
    ranks=Ranks.SHARDED,
    compute=compute,
)
