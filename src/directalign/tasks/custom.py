"""Your own data in TRL's standard formats: local json/jsonl/csv/parquet files or a hub dataset.

Formats, recognised by their (mapped) columns, each standard (strings) or conversational (lists of
``{role, content}`` messages):

- prompt-completion (``prompt``, ``completion``): examples with source = prompt, reference = completion;
- preference (``prompt``, ``chosen``, ``rejected``): the human pairs, and, when they are ``task.data``,
  also the examples (reference = chosen: the policy is first fine-tuned on the preferred answers);
- plain text (``text``): cut at ``task.text_separator`` into prompt and completion, refused without one
  (the pipeline needs a prompt for every example).

A conversational prompt must be a single user message (the pipeline adds ``model.system_prompt`` and the
chat template itself); a conversational completion is its last assistant message. Every check runs when
the examples are first read, which the pipeline does before any compute.
"""

import functools
import hashlib
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
from datasets.exceptions import DatasetGenerationError
from omegaconf import DictConfig, OmegaConf

from directalign.errors import ConfigError, DataError
from directalign.tasks.base import EXAMPLE_COLUMNS, PREFERENCE_COLUMNS, SPLITS, Task, assign_splits

log = logging.getLogger(__name__)

BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
# The splits a run without a gold judge reads examples of: sft trains, offpolicy is sampled, eval scored.
REQUIRED_SPLITS = ("sft", "offpolicy", "eval")
FORMATS = {
    "preference": ("prompt", "chosen", "rejected"),
    "prompt-completion": ("prompt", "completion"),
    "plain text": ("text",),
}


def content_id(*texts: str) -> str:
    """An id for rows without an ``id`` column: stable across runs and row order, as hash splits need."""
    return hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]


def builder_of(spec: DictConfig, path: str, key: str) -> str:
    if spec.builder is not None:
        return spec.builder
    suffix = Path(path).suffix.lower()
    if suffix not in BUILDERS:
        raise ConfigError(
            f"task.{key}.path: cannot tell the format of {path} from its suffix {suffix!r}; set"
            f" task.{key}.builder to json, csv or parquet"
        )
    return BUILDERS[suffix]


def check_config(task_cfg: DictConfig) -> None:
    """Each source names a hub dataset or local files that exist, in a format known from the suffix."""
    for key in ("data", "preferences"):
        spec = task_cfg[key]
        if key == "preferences" and not has_source(spec):
            continue
        if (spec.path is None) == (spec.hub_id is None):
            raise ConfigError(f"task.{key}: set exactly one of path (local files) or hub_id")
        if spec.path is not None:
            for path in local_files(spec).values():
                if not Path(path).is_file():
                    raise ConfigError(f"task.{key}.path: {path} does not exist")
                builder_of(spec, path, key)
    splits = task_cfg.data.splits or {}
    unknown = [name for name in splits if name not in SPLITS]
    if unknown:
        raise ConfigError(f"task.data.splits names {unknown}, not pipeline splits of {list(SPLITS)}")


def has_source(spec: DictConfig) -> bool:
    return spec.path is not None or spec.hub_id is not None


def local_files(spec: DictConfig) -> dict[str, str]:
    """Dataset split -> file: a single path is the dataset's ``train`` split, as datasets reads it."""
    if OmegaConf.is_dict(spec.path):
        return {str(split): str(path) for split, path in spec.path.items()}
    return {"train": str(spec.path)}


def read(spec: DictConfig, key: str, split: str) -> tuple[datasets.Dataset, str]:
    """One split of a source and a name for it in messages (its file, or the hub id and split)."""
    if spec.hub_id is not None:
        kwargs = {"name": spec.subset} if spec.subset is not None else {}
        data, origin = datasets.load_dataset(spec.hub_id, **kwargs), f"{spec.hub_id} ({split})"
    else:
        files = local_files(spec)
        builder, origin = builder_of(spec, next(iter(files.values())), key), files.get(split, str(spec.path))
        try:
            data = datasets.load_dataset(builder, data_files=files)
        except DatasetGenerationError as error:
            raise DataError(f"{origin}: cannot be read as {builder}: {error.__cause__ or error}") from None
    if split not in data:
        raise DataError(f"{origin}: no dataset split {split!r}; it has {list(data)}")
    return data[split], origin


def detect_format(columns: list[str], names: Mapping[str, str], origin: str) -> str:
    """The format the columns are in; a format's missing column is named with the columns there are."""
    has = {key for key in ("prompt", "completion", "chosen", "rejected", "text") if names[key] in columns}
    if has & {"chosen", "rejected"}:
        found = "preference"
    elif has & {"completion", "prompt"}:
        found = "prompt-completion"
    elif "text" in has:
        found = "plain text"
    else:
        raise DataError(
            f"{origin}: no columns of a known format (prompt+completion, prompt+chosen+rejected or text,"
            f" after task.columns); it has {columns}"
        )
    require(found, columns, names, origin)
    return found


def require(found: str, columns: list[str], names: Mapping[str, str], origin: str) -> None:
    for key in FORMATS[found]:
        if names[key] not in columns:
            raise DataError(
                f"{origin}: missing column {names[key]!r} (task.columns.{key}) of the {found} format;"
                f" it has {columns}"
            )


def message_text(messages: list[Any], role: str, where: str) -> str:
    """The content of the last ``role`` message of a conversation, refusing what a chat template would
    not render as text."""
    for message in messages:
        if not isinstance(message, Mapping) or not {"role", "content"} <= set(message):
            raise DataError(f"{where}: a message is not a {{role, content}} mapping: {message!r}")
        if not isinstance(message["content"], str):
            raise DataError(
                f"{where}: message content is {type(message['content']).__name__}, not text; only text"
                " messages can be rendered"
            )
    texts = [message["content"] for message in messages if message["role"] == role]
    if not texts:
        raise DataError(f"{where}: no {role} message (roles {[m['role'] for m in messages]})")
    return texts[-1]


def prompt_text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list):
        roles = [m.get("role") if isinstance(m, Mapping) else None for m in value]
        if roles != ["user"]:
            raise DataError(
                f"{where}: a conversational prompt must be one user message, got roles {roles}"
                " (set model.system_prompt for a system prompt; multi-turn prompts are not supported)"
            )
        return message_text(value, "user", where).strip()
    raise DataError(f"{where}: the prompt is {type(value).__name__}, neither text nor a list of messages")


def completion_text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list):
        return message_text(value, "assistant", where).strip()
    raise DataError(f"{where}: the completion is {type(value).__name__}, neither text nor messages")


def example_rows(data: datasets.Dataset, found: str, cfg: DictConfig, origin: str) -> pd.DataFrame:
    """Examples (id, source, reference); content-hashed ids are the prompt's, so that rows repeating a
    prompt are dropped (counted in the log) rather than land in two splits."""
    names, rows = cfg.columns, []
    for row, record in enumerate(data):
        where = f"{origin}, row {row}"
        if found == "plain text":
            if cfg.text_separator is None:
                raise DataError(
                    f"{origin}: plain text (column {names.text!r}) has no prompt; set task.text_separator"
                    " to cut each text into a prompt and its completion"
                )
            text = record[names.text]
            if not isinstance(text, str):
                raise DataError(f"{where}: the text is {type(text).__name__}, not text")
            source, separator, reference = text.partition(cfg.text_separator)
            if not separator:
                raise DataError(f"{where}: no task.text_separator {cfg.text_separator!r} in the text")
            source, reference = source.strip(), reference.strip()
        else:
            source = prompt_text(record[names.prompt], where)
            answer = names.chosen if found == "preference" else names.completion
            reference = completion_text(record[answer], where)
        has_id = names.id in record and record[names.id] is not None
        example_id = str(record[names.id]) if has_id else content_id(source)
        rows.append({"id": example_id, "source": source, "reference": reference})
    frame = pd.DataFrame(rows, columns=list(EXAMPLE_COLUMNS))
    if names.id not in data.column_names:
        unique = frame.drop_duplicates("id")
        if len(unique) < len(frame):
            log.info("custom: %s: dropped %d rows repeating a prompt", origin, len(frame) - len(unique))
        frame = unique
    return frame


def pair_rows(data: datasets.Dataset, cfg: DictConfig, origin: str) -> pd.DataFrame:
    names, rows = cfg.columns, []
    for row, record in enumerate(data):
        where = f"{origin}, row {row}"
        source = prompt_text(record[names.prompt], where)
        chosen = completion_text(record[names.chosen], where)
        rejected = completion_text(record[names.rejected], where)
        has_id = names.id in record and record[names.id] is not None
        pair_id = str(record[names.id]) if has_id else content_id(source, chosen, rejected)
        rows.append({"id": pair_id, "source": source, "chosen": chosen, "rejected": rejected})
    return pd.DataFrame(rows, columns=list(PREFERENCE_COLUMNS))


def shares(fractions: Mapping[str, float], names: list[str]) -> dict[str, float]:
    """With ``task.data.splits``, the pipeline splits read from one dataset split cut all of it in
    proportion to their fractions (e.g. sft and offpolicy share train while eval is test)."""
    total = sum(fractions.get(name, 0.0) for name in names)
    return {name: fractions.get(name, 0.0) / total if total > 0 else 0.0 for name in names}


class CustomTask(Task):
    """Examples and human preference pairs read from the user's files; no gold judge, so the learned
    reward model is the only scorer (as for tldr)."""

    def __init__(self, cfg: DictConfig, cache_dir: Path):
        super().__init__(cfg, cache_dir)
        check_config(cfg)

    def prompt_messages(self, source: str) -> list[dict[str, str]]:
        """The user's prompt as it is, after the instruction where one is configured."""
        content = f"{self.cfg.instruction}\n\n{source}" if self.cfg.instruction else source
        return [{"role": "user", "content": content}]

    @functools.cached_property
    def _splits(self) -> dict[str, datasets.Dataset]:
        cfg = self.cfg
        mapping = dict(cfg.data.splits or dict.fromkeys(cfg.split_fractions, cfg.data.split))
        frames, origins = {}, {}
        for dataset_split in dict.fromkeys(mapping.values()):
            data, origin = read(cfg.data, "data", dataset_split)
            frame = example_rows(data, detect_format(data.column_names, cfg.columns, origin), cfg, origin)
            names = [name for name, split in mapping.items() if split == dataset_split]
            fractions = shares(cfg.split_fractions, names) if cfg.data.splits else cfg.split_fractions
            for name, examples in assign_splits(frame, fractions, cfg.split_salt).items():
                frames[name], origins[name] = examples, f"{origin} ({len(frame)} examples)"
        limits, result = cfg.max_examples_per_split or {}, {}
        for name in SPLITS:
            examples = frames.get(name, datasets.Dataset.from_dict({c: [] for c in EXAMPLE_COLUMNS}))
            if limits.get(name) is not None:
                examples = examples.select(range(min(limits[name], len(examples))))
            if name in REQUIRED_SPLITS and len(examples) == 0:
                origin = origins.get(name, "no dataset split")
                raise DataError(
                    f"task {cfg.name!r}: split {name!r} is empty (from {origin});"
                    " give it a share of task.split_fractions or a dataset split in task.data.splits"
                )
            result[name] = examples
        return result

    @functools.cached_property
    def _pairs(self) -> datasets.Dataset | None:
        """The preference pairs, checked now so that a file of unusable pairs stops the run before SFT."""
        cfg = self.cfg
        if has_source(cfg.preferences):
            data, origin = read(cfg.preferences, "preferences", cfg.preferences.split)
            require("preference", data.column_names, cfg.columns, origin)
        else:
            data, origin = read(cfg.data, "data", cfg.data.split)
            if detect_format(data.column_names, cfg.columns, origin) != "preference":
                return None
        pairs = pair_rows(data, cfg, origin)
        nonempty = (pairs[["source", "chosen", "rejected"]] != "").all(axis=1)
        if not (nonempty & (pairs["chosen"] != pairs["rejected"])).any():
            raise DataError(
                f"{origin}: none of its {len(pairs)} preference pairs is usable (each has an empty text or"
                " chosen identical to rejected)"
            )
        excluded = {
            source for name in cfg.exclude_preference_splits for source in self._splits[name]["source"]
        }
        kept = pairs[~pairs["source"].isin(excluded)]
        log.info(
            "custom: %d preference pairs kept of %d in %s (%d on %s prompts)",
            len(kept),
            len(pairs),
            origin,
            len(pairs) - len(kept),
            sorted(cfg.exclude_preference_splits),
        )
        return datasets.Dataset.from_pandas(kept, preserve_index=False)

    def examples(self, split: str) -> datasets.Dataset:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        self._pairs  # noqa: B018 - read with the examples, so bad pairs are refused before any compute
        return self._splits[split]

    def human_preferences(self) -> datasets.Dataset | None:
        """The data's preference pairs, minus those on prompts of ``exclude_preference_splits``; pairs
        with an empty text or chosen == rejected are left to the reward stage, which drops and counts them."""
        return self._pairs
