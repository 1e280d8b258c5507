"""Typed stage outputs. Each class owns its folder layout, writing and reading it, so a downstream
stage asks for ``policy.load(device)`` or ``reward.scorer(...)`` and never names a file."""

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import datasets
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from directalign.models import merge_lora
from directalign.scoring import Scorer
from directalign.store import Artifact
from directalign.tasks.base import GoldJudge


@dataclass(frozen=True)
class ModelArtifact(Artifact):
    """A transformers model and its tokenizer, saved with ``save_pretrained`` in one folder."""

    MODEL_DIR: ClassVar[str] = "model"

    @property
    def model_dir(self) -> Path:
        return self.path / self.MODEL_DIR

    @classmethod
    def save(cls, folder: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        model.save_pretrained(folder / cls.MODEL_DIR)
        tokenizer.save_pretrained(folder / cls.MODEL_DIR)


@dataclass(frozen=True)
class PolicyArtifact(ModelArtifact):
    """A causal LM: SFT's output."""

    def load(self, device: torch.device | None = None) -> PreTrainedModel:
        model = AutoModelForCausalLM.from_pretrained(self.model_dir)
        return model if device is None else model.to(device)

    @property
    def context_length(self) -> int | None:
        """The policy's number of positions, read from its config without loading the weights."""
        return getattr(AutoConfig.from_pretrained(self.model_dir), "max_position_embeddings", None)

    @classmethod
    def save(cls, folder: Path, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
        """LoRA adapters folded in, so a plain ``from_pretrained`` loads the policy."""
        super().save(folder, merge_lora(model), tokenizer)


@dataclass(frozen=True)
class AlignedPolicy(PolicyArtifact):
    """An aligned policy, the method settings it was trained with, and its reward-vs-step curve."""

    CURVE_FILE: ClassVar[str] = "reward_curve.json"

    @property
    def method(self) -> dict[str, Any]:
        """``loss``, ``beta`` and ``length_power`` as the manifest recorded them."""
        return self.manifest["config"]["method"]

    def curve(self) -> list[dict[str, Any]]:
        return json.loads((self.path / self.CURVE_FILE).read_text())

    @classmethod
    def save_curve(cls, folder: Path, points: list[dict[str, Any]]) -> None:
        (folder / cls.CURVE_FILE).write_text(json.dumps(points, indent=2))


@dataclass(frozen=True)
class RewardArtifact(ModelArtifact):
    """A sequence classifier with one logit, read as (source, completion) text pairs."""

    @property
    def calibration_scale(self) -> float:
        """The temperature fitted on held-out pairs (1: the stage did not calibrate)."""
        calibration = self.metrics.get("calibration")
        return 1.0 if calibration is None else calibration["scale"]

    def scorer(self, gold: GoldJudge | None, device: torch.device) -> Scorer:
        """The calibrated proxy reward (this model) beside the task's gold judge, on ``device``."""
        max_length = self.manifest["config"]["stage.reward"]["max_length"]
        return Scorer(self.model_dir, max_length, gold, self.calibration_scale).to(device)


@dataclass(frozen=True)
class OffPolicyData(Artifact):
    """One row per prompt: its K completions, their rewards and their reference log-probs per token."""

    DATA_DIR: ClassVar[str] = "data"

    def dataset(self) -> datasets.Dataset:
        return datasets.load_from_disk(str(self.path / self.DATA_DIR))

    @classmethod
    def save(cls, folder: Path, rows: list[dict[str, Any]]) -> None:
        shutil.rmtree(folder / cls.DATA_DIR, ignore_errors=True)  # a killed attempt's partial copy
        datasets.Dataset.from_list(rows).save_to_disk(folder / cls.DATA_DIR)


@dataclass(frozen=True)
class EvalRecord:
    """One evaluated policy: the artifact it evaluated (``<stage>/<key>``), its metrics, its samples
    (``sample`` numbers them per prompt) and its greedy outputs on the first few prompts."""

    policy: str
    metrics: dict[str, Any]
    samples: list[dict[str, Any]]
    greedy: list[dict[str, Any]]


@dataclass(frozen=True)
class Evaluation(Artifact):
    """A policy's samples on the held-out prompts, one JSON line each, and their mean metrics."""

    SAMPLES_FILE: ClassVar[str] = "samples.jsonl"
    GREEDY_FILE: ClassVar[str] = "greedy.jsonl"

    def record(self) -> EvalRecord:
        return EvalRecord(
            self.manifest["upstream"]["policy"],
            self.metrics,
            read_jsonl(self.path / self.SAMPLES_FILE),
            read_jsonl(self.path / self.GREEDY_FILE),
        )

    @classmethod
    def save(cls, folder: Path, samples: list[dict[str, Any]], greedy: list[dict[str, Any]]) -> None:
        write_jsonl(folder / cls.SAMPLES_FILE, samples)
        write_jsonl(folder / cls.GREEDY_FILE, greedy)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with path.open("w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in records)


@dataclass(frozen=True)
class TrunkStates(Artifact):
    """The hidden states entering the policy's first trained layer, one ``[p + sum_k c_k, H]`` tensor per
    off-policy row (its prompt's tokens, then each completion's), in the dataset's row order."""

    STATES_FILE: ClassVar[str] = "states.pt"

    @property
    def first_layer(self) -> int:
        return self.metrics["first_layer"]

    def rows(self) -> list[torch.Tensor]:
        saved = torch.load(self.path / self.STATES_FILE, weights_only=True)
        return list(saved["states"].split(saved["row_lengths"].tolist()))

    @classmethod
    def save(cls, folder: Path, rows: list[torch.Tensor]) -> dict[str, int]:
        """Writes the rows as one tensor and their lengths; returns the bytes held in memory and on disk."""
        states, lengths = torch.cat(rows), torch.tensor([len(row) for row in rows])
        torch.save({"states": states, "row_lengths": lengths}, folder / cls.STATES_FILE)
        return {
            "memory_bytes": states.numel() * states.element_size(),
            "disk_bytes": (folder / cls.STATES_FILE).stat().st_size,
        }
