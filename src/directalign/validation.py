"""Refuse bad configs before any compute and bad data before it is trained on, each with one line that
names the key, or the split (or file) and row."""

import importlib.metadata
import importlib.util
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf

from directalign.errors import ConfigError, DataError
from directalign.losses import LOSSES
from directalign.models import pretrained_reward_model
from directalign.sampling import SAMPLING_STAGES
from directalign.tasks.base import EXAMPLE_COLUMNS, SPLITS
from directalign.tasks.custom import CustomTask
from directalign.tasks.custom import check_config as check_custom_task

if TYPE_CHECKING:
    from directalign.tasks.base import Task

STAGE_ORDER = ("sft", "reward", "generate", "align", "evaluate")
TRAINING_STAGES = ("sft", "reward", "align")
GENERATION_BACKENDS = ("hf", "vllm")
REWARD_SOURCES = ("proxy", "gold")
REFERENCES = ("sft", "previous")
ROUND_SAMPLERS = ("policy", "sft")
# Chat template, system prompt and instruction around the source: a generous bound, checked exactly
# per prompt once the tokenizer has built them (check_prompt_lengths).
TEMPLATE_TOKENS = 64
# [CLS] source [SEP] completion [SEP]: what a reward model's text pair costs besides its two texts.
PAIR_SPECIAL_TOKENS = 3


def _number(where: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(f"{where}={value!r} must be a number")
    return value


def _positive(where: str, value: Any) -> None:
    _finite(where, value)
    if not value > 0:
        raise ConfigError(f"{where}={value} must be > 0")


def _count(where: str, value: Any, minimum: int = 1, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"an integer >= {minimum}" + (" or null" if optional else "")
        raise ConfigError(f"{where}={value!r} must be {allowed}")


def _finite(where: str, value: Any) -> None:
    if not math.isfinite(_number(where, value)):
        raise ConfigError(f"{where}={value} must be finite")


def _in_range(where: str, value: Any, low: float, high: float, open_low: bool = False) -> None:
    value = _number(where, value)
    if not (low < value <= high if open_low else low <= value <= high):
        raise ConfigError(f"{where}={value} must lie in {'(' if open_low else '['}{low}, {high}]")


def _check_method(where: str, method: DictConfig) -> None:
    if method.loss not in LOSSES:
        raise ConfigError(f"{where}.loss={method.loss!r} is not one of {', '.join(LOSSES)}")
    _positive(f"{where}.beta", method.beta)
    for setting in LOSSES[method.loss].settings:
        _finite(f"{where}.{setting}", method.get(setting))
    _in_range(f"{where}.length_power", method.length_power, 0.0, 1.0)
    if method.get("reference", "sft") not in REFERENCES:
        raise ConfigError(f"{where}.reference={method.reference!r} is not one of {', '.join(REFERENCES)}")
    seeds = method.seeds
    if not OmegaConf.is_list(seeds) or not seeds or len(set(seeds)) < len(seeds):
        raise ConfigError(f"{where}.seeds={seeds} must be a non-empty list of distinct training seeds")
    for i, seed in enumerate(seeds):
        _count(f"{where}.seeds[{i}]", seed, minimum=0)


def _installed_file(where: str, package: str, file: str) -> None:
    try:
        path = Path(importlib.metadata.distribution(package).locate_file(file))
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(f"{where}: package {package!r} is not installed (run `make install`)") from None
    if not path.is_file():
        raise ConfigError(f"{where}: {path} does not exist")


def _importable(where: str, package: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f"{where}: package {package!r} is not installed (run `make install`)")


def _check_sources(cfg: DictConfig) -> None:
    """Local models and packaged files exist (hub ids are only known once downloaded)."""
    model = cfg.model
    if model.source == "path" and not Path(model.path).is_dir():
        raise ConfigError(f"model.path={model.path} does not exist")
    if model.source == "gguf":
        _installed_file("model", model.gguf_package, model.gguf_file)
    if model.source == "random":
        tokenizer = model.tokenizer
        if tokenizer.source == "gguf":
            _installed_file("model.tokenizer", tokenizer.gguf_package, tokenizer.gguf_file)
        if tokenizer.source == "path" and not Path(tokenizer.path).is_dir():
            raise ConfigError(f"model.tokenizer.path={tokenizer.path} does not exist")
    reward_model = cfg.reward_model
    if reward_model.source == "package":
        _importable("reward_model", reward_model.package)
    if reward_model.source == "random":
        _importable("reward_model", reward_model.tokenizer_package)
    if reward_model.source == "pretrained":
        pretrained_reward_model(reward_model)  # reads its config only: one output, a sequence classifier


def context_length(model_cfg: DictConfig) -> int | None:
    """The policy's number of positions where the config tells it without loading the model."""
    positions = model_cfg.get("architecture", {}).get("max_position_embeddings")
    config_file = Path(model_cfg.path) / "config.json" if model_cfg.source == "path" else None
    if positions is None and config_file is not None and config_file.is_file():
        positions = json.loads(config_file.read_text()).get("max_position_embeddings")
    return positions


def _check_lengths(cfg: DictConfig) -> None:
    task = cfg.task
    _count("task.max_completion_tokens", task.max_completion_tokens)
    _count("task.max_source_tokens", task.max_source_tokens)
    positions = context_length(cfg.model)
    needed = task.max_source_tokens + task.max_completion_tokens + TEMPLATE_TOKENS
    if positions is not None and needed > positions:
        raise ConfigError(
            f"task.max_source_tokens={task.max_source_tokens} + task.max_completion_tokens="
            f"{task.max_completion_tokens} (+{TEMPLATE_TOKENS} for the template) exceeds the model's"
            f" {positions} positions"
        )
    max_length = cfg.stage.reward.max_length
    _count("stage.reward.max_length", max_length)
    if max_length <= task.max_completion_tokens + PAIR_SPECIAL_TOKENS:
        raise ConfigError(
            f"stage.reward.max_length={max_length} leaves the reward model no room for a source next to"
            f" a completion of task.max_completion_tokens={task.max_completion_tokens}"
        )
    rm_positions = cfg.reward_model.get("architecture", {}).get("max_position_embeddings")
    if rm_positions is not None and max_length > rm_positions:
        raise ConfigError(
            f"stage.reward.max_length={max_length} exceeds reward_model.architecture.max_position_embeddings"
            f"={rm_positions}"
        )


CLAIM_KEYS = ("claim", "paper", "contrast", "metric", "direction")
CLAIM_METRICS = ("proxy_reward", "gold_reward", "length_tokens", "kl_to_ref")


def _check_contrasts(cfg: DictConfig) -> None:
    names = ["sft", *(cfg.compare or [cfg.method.name])]
    for i, contrast in enumerate(cfg.contrasts):
        if len(contrast) != 2 or any(name not in names for name in contrast):
            raise ConfigError(f"contrasts[{i}]={list(contrast)} must name two evaluated policies of {names}")
    for i, claim in enumerate(cfg.claims):
        where = f"claims[{i}]"
        if sorted(claim) != sorted(CLAIM_KEYS):
            raise ConfigError(f"{where} has keys {sorted(claim)}; a claim has exactly {list(CLAIM_KEYS)}")
        if len(claim.contrast) != 2 or any(name not in names for name in claim.contrast):
            raise ConfigError(
                f"{where}.contrast={list(claim.contrast)} must name two evaluated policies of {names}"
            )
        if claim.metric not in CLAIM_METRICS:
            raise ConfigError(f"{where}.metric={claim.metric!r} must be one of {list(CLAIM_METRICS)}")
        if claim.metric == "gold_reward" and cfg.task.get("gold") is None:
            raise ConfigError(f"{where}.metric='gold_reward' needs a task with a gold judge")
        if claim.direction not in (1, -1, 0):
            raise ConfigError(f"{where}.direction={claim.direction!r} must be +1, -1 or 0 (either way)")


def _check_sampling(cfg: DictConfig) -> None:
    for name in SAMPLING_STAGES:
        where, block = f"stage.{name}.sampling", cfg.stage[name].sampling
        _count(f"{where}.num_samples", block.num_samples)
        _positive(f"{where}.temperature", block.temperature)
        _in_range(f"{where}.top_p", block.top_p, 0.0, 1.0, open_low=True)
        _count(f"{where}.batch_size", block.batch_size)
    pairs = cfg.stage.reward.sampling.num_samples
    if pairs != 2:
        raise ConfigError(
            f"stage.reward.sampling.num_samples={pairs} must be 2: the simulated labeller compares a pair"
        )
    generate = cfg.stage.generate
    if generate.sampling.num_samples < 2:
        raise ConfigError(
            f"stage.generate.sampling.num_samples={generate.sampling.num_samples} gives fewer than 2"
            " completions per prompt"
        )
    _positive("stage.reward.label_temperature", cfg.stage.reward.label_temperature)
    if generate.reward_source not in REWARD_SOURCES:
        raise ConfigError(
            f"stage.generate.reward_source={generate.reward_source!r} must be one of {list(REWARD_SOURCES)}"
        )
    gold = cfg.task.get("gold")
    if gold is not None and "label_length_bias" in gold:
        _finite("task.gold.label_length_bias", gold.label_length_bias)
    if generate.reward_source == "gold" and gold is None:
        raise ConfigError(
            "stage.generate.reward_source='gold' needs a task with a gold judge;"
            f" task {cfg.task.name!r} has none"
        )
    evaluate = cfg.stage.evaluate
    _count("stage.evaluate.greedy_prompts", evaluate.greedy_prompts, minimum=0)
    for i, n in enumerate(evaluate.best_of_n):
        _count(f"stage.evaluate.best_of_n[{i}]", n)
    if generate.backend not in GENERATION_BACKENDS:
        raise ConfigError(
            f"stage.generate.backend={generate.backend!r} must be one of {list(GENERATION_BACKENDS)}"
        )
    if generate.backend == "vllm" and (cfg.trainer.devices != 1 or cfg.trainer.num_nodes != 1):
        raise ConfigError(
            "stage.generate.backend='vllm' runs one engine in one process: it needs trainer.devices=1 and"
            f" trainer.num_nodes=1 (got {cfg.trainer.devices} and {cfg.trainer.num_nodes})"
        )
    if generate.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "stage.generate.backend='vllm' needs the vllm package (pip install vllm), not installed here"
        )


def _check_stages(cfg: DictConfig) -> None:
    stage = cfg.stage
    for name in TRAINING_STAGES:
        for key in ("lr", "epochs", "batch_size"):
            _positive(f"stage.{name}.{key}", stage[name][key])
        _count(f"stage.{name}.checkpoint_every_n_steps", stage[name].checkpoint_every_n_steps)
    for name in TRAINING_STAGES:
        _in_range(f"stage.{name}.warmup_ratio", stage[name].warmup_ratio, 0.0, 1.0)
        weight_decay = stage[name].weight_decay
        _finite(f"stage.{name}.weight_decay", weight_decay)
        if weight_decay < 0:
            raise ConfigError(f"stage.{name}.weight_decay={weight_decay} must be >= 0")
    _in_range("stage.reward.validation_fraction", stage.reward.validation_fraction, 0.0, 1.0, open_low=True)
    for name in ("sft", "reward", "generate", "evaluate"):
        _count(f"stage.{name}.max_prompts", stage[name].max_prompts, optional=True)
    _count("stage.align.curve_every_n_steps", stage.align.curve_every_n_steps)
    _count("stage.align.curve_prompts", stage.align.curve_prompts, minimum=0)
    _count("stage.align.prompts_per_batch", stage.align.prompts_per_batch)
    _count("stage.evaluate.prompt_offset", stage.evaluate.prompt_offset, minimum=0)
    if not isinstance(stage.align.replay, bool):
        raise ConfigError(f"stage.align.replay={stage.align.replay!r} must be true or false")


def _check_rounds(cfg: DictConfig) -> None:
    """Replay trains on earlier rounds' samples as stored, and offline rounds store SFT's log-probs:
    either needs SFT as every method's reference."""
    _count("pipeline.rounds", cfg.pipeline.rounds)
    if cfg.pipeline.round_sampler not in ROUND_SAMPLERS:
        raise ConfigError(
            f"pipeline.round_sampler={cfg.pipeline.round_sampler!r} must be one of {list(ROUND_SAMPLERS)}"
        )
    offline = cfg.pipeline.round_sampler == "sft"
    if not (cfg.stage.align.replay or offline):
        return
    methods = cfg.compare.items() if cfg.compare else [("method", cfg.method)]
    for name, method in methods:
        reference = method.get("reference", "sft")
        if reference != "sft":
            where = f"compare.{name}" if cfg.compare else name
            if offline:
                raise ConfigError(
                    f"pipeline.round_sampler=sft needs {where}.reference=sft, not {reference!r}: SFT"
                    " samples every round, so no previous policy scores them"
                )
            raise ConfigError(
                f"stage.align.replay=true needs {where}.reference=sft, not {reference!r}: an earlier"
                " round's samples store the log-probs of that round's own reference"
            )


def _check_all_finite(where: str, node: Any) -> None:
    """Every number anywhere in the config is finite, whichever check reads it (and those none reads)."""
    if isinstance(node, dict):
        for key, value in node.items():
            _check_all_finite(f"{where}.{key}" if where else str(key), value)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_all_finite(f"{where}[{i}]", value)
    elif isinstance(node, float):
        _finite(where, node)


def _check_compare(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """With ``compare`` set, ``method`` is composed but not aligned: an override of it would change
    nothing, so it is refused rather than ignored."""
    if not cfg.compare:
        _check_method("method", cfg.method)
        return
    for override in overrides:
        if override.lstrip("+~").split("=")[0].split(".")[0] == "method":
            raise ConfigError(
                f"{override}: this experiment aligns the methods of `compare` ({', '.join(cfg.compare)}),"
                " not `method`; override compare.<name>.<key> instead (e.g. compare."
                f"{next(iter(cfg.compare))}.beta=...)"
            )
    for name, method in cfg.compare.items():
        _check_method(f"compare.{name}", method)


def _check_custom_task(cfg: DictConfig) -> None:
    """task=custom reads the user's files: a missing one is refused here, before any compute."""
    if cfg.task.cls == f"{CustomTask.__module__}.{CustomTask.__qualname__}":
        check_custom_task(cfg.task)


def validate_config(cfg: DictConfig, overrides: Sequence[str] = ()) -> None:
    """Raise ConfigError on the first value that cannot work; it reads no data and loads no model.
    ``overrides`` are the command line's (Hydra's), checked against ``compare``."""
    stages = list(cfg.pipeline.stages)
    if stages != list(STAGE_ORDER[: len(stages)]):
        raise ConfigError(f"pipeline.stages={stages} must be a prefix of {list(STAGE_ORDER)}")
    _count("seed", cfg.seed, minimum=0)
    _check_compare(cfg, overrides)
    _check_contrasts(cfg)
    _check_sampling(cfg)
    _check_lengths(cfg)
    _check_stages(cfg)
    _check_rounds(cfg)
    _check_sources(cfg)
    _check_custom_task(cfg)
    _check_all_finite("", OmegaConf.to_container(cfg, resolve=False))


def require_columns(where: str, columns: Sequence[str], required: Iterable[str]) -> None:
    missing = [name for name in required if name not in columns]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; it has {list(columns)}")


def check_task_data(task: "Task") -> None:
    """Every split has the example columns and a non-empty source and reference in every row, and no id
    appears twice, in one split or across splits (a shared id leaks training data into evaluation)."""
    first_seen: dict[str, tuple[str, int]] = {}
    for split in SPLITS:
        where = f"task {task.cfg.name!r}, split {split!r}"
        examples = task.examples(split)
        require_columns(where, examples.column_names, EXAMPLE_COLUMNS)
        rows = zip(examples["id"], examples["source"], examples["reference"], strict=True)
        for row, (example_id, source, reference) in enumerate(rows):
            for column, text in (("source", source), ("reference", reference)):
                if not isinstance(text, str) or not text.strip():
                    raise DataError(f"{where}, row {row} (id {example_id!r}): empty {column}")
            if example_id in first_seen:
                other_split, other_row = first_seen[example_id]
                raise DataError(
                    f"{where}, row {row}: id {example_id!r} is also row {other_row} of split {other_split!r}"
                )
            first_seen[example_id] = (split, row)


def check_prompt_lengths(
    where: str, prompt_ids: list[list[int]], ids: list[str], max_completion_tokens: int, positions: int | None
) -> None:
    """Each prompt, its source already cut to ``task.max_source_tokens``, must leave the model room for a
    whole completion."""
    if positions is None:
        return
    for row, prompt in enumerate(prompt_ids):
        if len(prompt) + max_completion_tokens > positions:
            raise DataError(
                f"{where}, row {row} (id {ids[row]!r}): a prompt of {len(prompt)} tokens plus"
                f" task.max_completion_tokens={max_completion_tokens} exceeds the model's {positions}"
                " positions; lower task.max_source_tokens"
            )
