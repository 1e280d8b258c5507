"""Build tokenizers, policies and reward models from their config groups.

Offline models come from installed packages (a GGUF file, a packaged encoder); the GGUF policy is
dequantised once into the store, so every later load is a plain ``from_pretrained``.
"""

import importlib.metadata
import importlib.resources
import logging
import shutil
from pathlib import Path

import torch
from filelock import FileLock
from jinja2 import TemplateError
from omegaconf import DictConfig, OmegaConf
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from directalign.errors import ConfigError

log = logging.getLogger(__name__)


def _gguf_path(cfg: DictConfig) -> Path:
    try:
        path = Path(importlib.metadata.distribution(cfg.gguf_package).locate_file(cfg.gguf_file))
    except importlib.metadata.PackageNotFoundError as error:
        raise ConfigError(f"model needs the package {cfg.gguf_package!r}: run `make install`") from error
    if not path.is_file():
        raise ConfigError(f"model: GGUF file not found: {path}")
    return path


def _converted_gguf(cfg: DictConfig, cache_root: Path) -> Path:
    """Dequantise a GGUF checkpoint to a safetensors folder once; later calls just return it."""
    target = cache_root / "models" / cfg.name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        gguf = _gguf_path(cfg)
        log.info("dequantising %s to %s (once)", gguf.name, target)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(target)
    return target


def _cached_gguf_tokenizer(cfg: DictConfig, cache_root: Path) -> Path:
    """Only the tokenizer of a GGUF file, saved once (a random-init policy needs no weights)."""
    target = cache_root / "models" / f"{Path(cfg.gguf_file).stem}-tokenizer"
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not (target / "tokenizer_config.json").is_file():
            gguf = _gguf_path(cfg)
            partial = target.with_name(target.name + ".partial")
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(partial)
            partial.rename(target)
    return target


def _package_dir(package: str, subdir: str) -> Path:
    try:
        return Path(str(importlib.resources.files(package) / subdir))
    except ModuleNotFoundError as error:
        raise ConfigError(f"reward model needs the package {package!r}: run `make install`") from error


def pretrained_source(cfg: DictConfig, cache_root: Path) -> str:
    """The folder or hub id that ``from_pretrained`` reads for a non-random model config."""
    if cfg.source == "gguf":
        return str(_converted_gguf(cfg, cache_root))
    if cfg.source == "hub":
        return cfg.hub_id
    if cfg.source == "path":
        if not Path(cfg.path).is_dir():
            raise ConfigError(f"model.path={cfg.path} does not exist")
        return cfg.path
    raise ConfigError(f"model.source must be gguf, hub, path or random, got {cfg.source!r}")


def load_tokenizer(cfg: DictConfig, cache_root: Path) -> PreTrainedTokenizerBase:
    """The policy tokenizer; a pad token is set (to eos) because batched generation needs one."""
    if cfg.source == "random":
        tokenizer_cfg = cfg.tokenizer
        if tokenizer_cfg.source == "gguf":
            folder = str(_cached_gguf_tokenizer(tokenizer_cfg, cache_root))
        else:
            folder = pretrained_source(tokenizer_cfg, cache_root)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    else:
        tokenizer = AutoTokenizer.from_pretrained(pretrained_source(cfg, cache_root))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_prompt_format(tokenizer, cfg.system_prompt, cfg.name)
    return tokenizer


def check_prompt_format(tokenizer: PreTrainedTokenizerBase, system_prompt: str | None, name: str) -> None:
    """Render one prompt the way the stages build theirs (``prompts.build_prompts``): a chat template that
    refuses it (many refuse a system message) is refused here in one line, not halfway through a stage.
    A tokenizer without a chat template gets plain text, which always renders."""
    if not tokenizer.chat_template:
        return
    messages = [{"role": "user", "content": "Hello."}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    try:
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except TemplateError as error:
        hint = "; set model.system_prompt=null" if system_prompt else ""
        raise ConfigError(
            f"model {name!r}: the tokenizer's chat template cannot render a prompt of roles"
            f" {[m['role'] for m in messages]} ({error}){hint}"
        ) from None


def build_policy(cfg: DictConfig, cache_root: Path, vocab_size: int, seed: int) -> PreTrainedModel:
    """The initial policy: pretrained weights, or a seeded random init of the given architecture."""
    if cfg.source == "random":
        arch = OmegaConf.to_container(cfg.architecture)
        config = AutoConfig.for_model(arch.pop("model_type"), vocab_size=vocab_size, **arch)
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(pretrained_source(cfg, cache_root), dtype=torch.float32)


def pretrained_reward_model(cfg: DictConfig) -> str:
    """The folder or hub id in ``reward_model.pretrained``, checked from its config alone (no weights
    loaded, so a run can refuse it before any compute): a reward is one number, so the model must be a
    sequence classifier with exactly one output. A causal LM's folder would otherwise load with a new
    random score head that nothing trains."""
    if not cfg.get("pretrained"):
        raise ConfigError("reward_model.pretrained must name a local folder or a hub id of a reward model")
    name = str(cfg.pretrained)
    if (Path(name).is_absolute() or name.startswith(".")) and not Path(name).is_dir():
        raise ConfigError(f"reward_model.pretrained={name} does not exist")
    try:
        config = AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(
            f"reward_model.pretrained={name} is neither a model folder here nor a hub model that can be"
            f" loaded ({reason})"
        ) from None
    architectures = config.architectures or []
    if not any(architecture.endswith("ForSequenceClassification") for architecture in architectures):
        raise ConfigError(
            f"reward_model.pretrained={name} is {architectures or 'of no architecture'}, not a sequence"
            " classifier (...ForSequenceClassification with one output)"
        )
    if config.num_labels != 1:
        raise ConfigError(
            f"reward_model.pretrained={name} has {config.num_labels} outputs (labels"
            f" {list(config.id2label.values())}); a reward model has exactly one"
        )
    return name


def reward_model_origin(cfg: DictConfig, model: PreTrainedModel) -> dict[str, str | None]:
    """Where a pretrained reward model came from, for the reward stage's manifest: the absolute folder
    (a relative one depends on the working directory) or the hub id and the commit it resolved to."""
    name = str(cfg.pretrained)
    local = Path(name).is_dir()
    return {
        "pretrained": str(Path(name).resolve()) if local else name,
        "kind": "local folder" if local else "hub",
        "revision": None if local else getattr(model.config, "_commit_hash", None),
    }


def build_reward_model(
    cfg: DictConfig, sft_dir: Path, seed: int
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A scalar-head sequence classifier and its tokenizer, as named by the reward_model group."""
    if cfg.source == "pretrained":
        name = pretrained_reward_model(cfg)
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForSequenceClassification.from_pretrained(name, dtype=torch.float32)
    elif cfg.source == "package":
        folder = _package_dir(cfg.package, cfg.subdir)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=1)
    elif cfg.source == "random":
        tokenizer = AutoTokenizer.from_pretrained(_package_dir(cfg.tokenizer_package, cfg.tokenizer_subdir))
        arch = OmegaConf.to_container(cfg.architecture)
        config = AutoConfig.for_model(
            arch.pop("model_type"), vocab_size=tokenizer.vocab_size, num_labels=1, **arch
        )
        torch.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_config(config)
    elif cfg.source == "sft_policy":
        tokenizer = AutoTokenizer.from_pretrained(sft_dir)
        model = AutoModelForSequenceClassification.from_pretrained(sft_dir, num_labels=1)
    else:
        raise ConfigError(
            f"reward_model.source must be package, random, sft_policy or pretrained, got {cfg.source!r}"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def with_lora(model: PreTrainedModel, lora_cfg: DictConfig | None) -> PreTrainedModel:
    """Wrap a policy in peft LoRA adapters when the stage's ``lora`` is set (None: full fine-tuning).

    ``layers_to_transform`` restricted to the top layers also stops backpropagation below them,
    which is what makes CPU training of a 135M model affordable.
    """
    if lora_cfg is None:
        return model
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(**OmegaConf.to_container(lora_cfg, resolve=True)))


def merge_lora(model: PreTrainedModel) -> PreTrainedModel:
    """The plain transformers model, with LoRA weights folded in, so ``from_pretrained`` loads it."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
