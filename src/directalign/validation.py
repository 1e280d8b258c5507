"""Refuse bad configs before any compute, with one line that names the key."""

from pathlib import Path

from omegaconf import DictConfig

from directalign.losses import LOSS_NAMES

STAGE_ORDER = ("sft", "reward", "generate", "align", "evaluate")


class ConfigError(ValueError):
    """A config value that cannot work."""


def methods_to_align(cfg: DictConfig) -> list[DictConfig]:
    """The methods of ``compare`` when it is set, else the single ``method``."""
    return list(cfg.compare.values()) if cfg.compare else [cfg.method]


def _check_method(where: str, method: DictConfig) -> None:
    if method.loss not in LOSS_NAMES:
        raise ConfigError(f"{where}.loss={method.loss!r} is not one of {', '.join(LOSS_NAMES)}")
    if not method.beta > 0:
        raise ConfigError(f"{where}.beta={method.beta} must be > 0")
    if not 0.0 <= method.length_power <= 1.0:
        raise ConfigError(f"{where}.length_power={method.length_power} must lie in [0, 1]")


def validate_config(cfg: DictConfig) -> None:
    stages = list(cfg.pipeline.stages)
    if stages != list(STAGE_ORDER[: len(stages)]):
        raise ConfigError(f"pipeline.stages={stages} must be a prefix of {list(STAGE_ORDER)}")
    if cfg.compare:
        for name, method in cfg.compare.items():
            _check_method(f"compare.{name}", method)
    else:
        _check_method("method", cfg.method)
    generate = cfg.stage.generate
    if generate.num_completions * len(generate.temperatures) < 2:
        raise ConfigError(
            f"stage.generate.num_completions={generate.num_completions} x"
            f" {len(generate.temperatures)} temperatures gives fewer than 2 completions per prompt"
        )
    for where, value in [
        *((f"stage.generate.temperatures[{i}]", t) for i, t in enumerate(generate.temperatures)),
        ("stage.reward.sampling.temperature", cfg.stage.reward.sampling.temperature),
        ("stage.evaluate.temperature", cfg.stage.evaluate.temperature),
        ("stage.reward.label_temperature", cfg.stage.reward.label_temperature),
    ]:
        if not value > 0:
            raise ConfigError(f"{where}={value} must be > 0")
    if cfg.task.max_completion_tokens < 1:
        raise ConfigError(
            f"task.max_completion_tokens={cfg.task.max_completion_tokens} leaves no room for a completion"
        )
    if cfg.task.max_source_tokens < 1:
        raise ConfigError(f"task.max_source_tokens={cfg.task.max_source_tokens} must be >= 1")
    positions = cfg.model.get("architecture", {}).get("max_position_embeddings")
    if positions is not None and cfg.task.max_source_tokens + cfg.task.max_completion_tokens + 64 > positions:
        raise ConfigError(
            f"task.max_source_tokens + task.max_completion_tokens (+64 for the template) exceeds"
            f" model.architecture.max_position_embeddings={positions}"
        )
    if cfg.model.source == "path" and not Path(cfg.model.path).is_dir():
        raise ConfigError(f"model.path={cfg.model.path} does not exist")
    for stage in ("sft", "reward", "align"):
        for key in ("lr", "batch_size", "epochs"):
            if not cfg.stage[stage][key] > 0:
                raise ConfigError(f"stage.{stage}.{key}={cfg.stage[stage][key]} must be > 0")
