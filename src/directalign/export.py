"""The off-policy dataset in TRL's preference format, for use outside this project.

The generate stage stores one row per prompt with its K completions; a preference dataset has one row per
pair. Each pair of a prompt's completions whose rewards differ becomes a row, the higher reward chosen,
as DPO and IPO train on them here (``pairs.ranked_pairs``; tied pairs dropped):

- ``prompt``, ``chosen``, ``rejected``: TRL's standard (text) preference format; the prompt is the exact
  text the completions were sampled from, the chat template already applied;
- ``chosen_reward``, ``rejected_reward``: the rewards alignment trains on (the calibrated reward model's,
  or the labeller's under ``stage.generate.reward_source=gold``);
- ``ref_chosen_logps``, ``ref_rejected_logps``: the SFT (reference) policy's log-probability of each
  completion, summed over its tokens, as TRL's DPOTrainer names its precomputed reference log-probs;
- ``prompt_ids``, ``chosen_ids``, ``rejected_ids``: the tokens those log-probs are of, and ``id``, the
  example's id.
"""

import logging
from pathlib import Path
from typing import Any

import datasets
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from directalign.artifacts import OffPolicyData, PolicyArtifact
from directalign.errors import ConfigError
from directalign.pairs import ranked_pairs
from directalign.store import MANIFEST, Store

log = logging.getLogger(__name__)

GENERATE = "generate"  # the stage whose artifact is the off-policy dataset
TEXT = datasets.Value("string")
NUMBER = datasets.Value("float64")
TOKENS = datasets.List(datasets.Value("int64"))
FEATURES = datasets.Features(
    {
        "id": TEXT,
        "prompt": TEXT,
        "chosen": TEXT,
        "rejected": TEXT,
        "chosen_reward": NUMBER,
        "rejected_reward": NUMBER,
        "ref_chosen_logps": NUMBER,
        "ref_rejected_logps": NUMBER,
        "prompt_ids": TOKENS,
        "chosen_ids": TOKENS,
        "rejected_ids": TOKENS,
    }
)


def preference_dataset(offpolicy: datasets.Dataset, tokenizer: PreTrainedTokenizerBase) -> datasets.Dataset:
    """One row per pair of differently rewarded completions of a prompt (``FEATURES``, described in the
    module's doc); ``tokenizer`` is the one that made the prompts (the SFT policy's)."""

    def to_pairs(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        out: dict[str, list[Any]] = {column: [] for column in FEATURES}
        for index, rewards in enumerate(batch["reward"]):
            prompt_ids = batch["prompt_ids"][index]
            prompt = tokenizer.decode(prompt_ids)
            for a, b in ranked_pairs(rewards, drop_ties=True)[0]:
                out["id"].append(batch["id"][index])
                out["prompt"].append(prompt)
                out["prompt_ids"].append(prompt_ids)
                for role, k in (("chosen", a), ("rejected", b)):
                    out[role].append(batch["completion_text"][index][k])
                    out[f"{role}_reward"].append(rewards[k])
                    out[f"ref_{role}_logps"].append(float(sum(batch["ref_logps"][index][k])))
                    out[f"{role}_ids"].append(batch["completion_ids"][index][k])
        return out

    return offpolicy.map(to_pairs, batched=True, remove_columns=offpolicy.column_names, features=FEATURES)


def find_offpolicy(path: Path) -> tuple[Store, str]:
    """The store and key of a completed off-policy dataset: ``path`` is its folder
    (``<store>/generate/<key>``) or a store holding exactly one."""
    if (path / MANIFEST).is_file():
        if path.parent.name != GENERATE:
            raise ConfigError(
                f"{path} is a {path.parent.name} artifact, not an off-policy dataset ({GENERATE})"
            )
        return Store(path.parent.parent), path.name
    keys = sorted(manifest.parent.name for manifest in path.glob(f"{GENERATE}/*/{MANIFEST}"))
    if len(keys) != 1:
        raise ConfigError(
            f"{path} holds {len(keys)} completed off-policy datasets {keys}; name one:"
            f" {path}/{GENERATE}/<key>"
        )
    return Store(path), keys[0]


def export_offpolicy(path: Path) -> datasets.Dataset:
    """The off-policy dataset at ``path`` (see ``find_offpolicy``) as a preference dataset; its files and
    its SFT policy's are checked against their manifests first."""
    store, key = find_offpolicy(path)
    data = store.load(GENERATE, key, OffPolicyData)
    sft_stage, sft_key = data.manifest["upstream"]["sft"].split("/")
    sft = store.load(sft_stage, sft_key, PolicyArtifact)
    if sft is None:
        raise ConfigError(f"{data.path}: its SFT policy {store.path(sft_stage, sft_key)} is not in the store")
    offpolicy = data.dataset()
    pairs = preference_dataset(offpolicy, AutoTokenizer.from_pretrained(sft.model_dir))
    log.info("%s: %d prompts -> %d preference pairs", data.path, len(offpolicy), len(pairs))
    return pairs
