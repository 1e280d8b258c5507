"""The README and docs/ say what runs: every `pipelines/<script>.py` command they show composes with
Hydra's compose API and passes the config checks (no compute), every `make <target>` names a target of
the Makefile, every relative link resolves inside the repository, and the README's generated tables
are what their files hold."""

import itertools
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

from directalign.claims import CLAIMS_BLOCK
from directalign.errors import ConfigError
from directalign.readme_blocks import render_blocks
from directalign.validation import validate_config
from tests.conftest import CONF, ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.DOTALL)
INLINE = re.compile(r"`([^`]+)`")
PLACEHOLDER = re.compile(r"<([A-Za-z_][\w-]*)>")
# A command may name files the reader makes first (the README's worked example writes my_data/).
USER_PATHS = ("my_data/", "PLACEHOLDER_")
SCRIPT = re.compile(r"(?:^|\s)(?:\S*/)?(pipelines/\w+\.py)(?=\s|$)")


def doc_id(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _without_code(text: str) -> str:
    return FENCE.sub("", text)


def command_lines(text: str) -> list[str]:
    """Shell lines of the fenced blocks (continuations joined, comments dropped) and inline code spans."""
    lines = []
    for block in FENCE.findall(text):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                lines.append(line)
    # Inline spans may wrap across lines of a paragraph.
    lines += [" ".join(span.split()) for span in INLINE.findall(_without_code(text))]
    return lines


def script_commands(text: str) -> list[tuple[str, list[str]]]:
    """(script, arguments) of every line that runs a pipelines/ script, placeholders made Hydra-safe."""
    found = []
    for line in command_lines(text):
        match = SCRIPT.search(line)
        if match is None or "..." in line:
            continue
        tail = PLACEHOLDER.sub(r"PLACEHOLDER_\1", line[match.end() :])
        found.append((match[1], shlex.split(tail)))
    return found


def make_commands(text: str) -> list[list[str]]:
    """The words after `make` of every line or span that starts with it."""
    return [shlex.split(line)[1:] for line in command_lines(text) if re.match(r"make(\s|$)", line)]


def hydra_config_name(script: str) -> str | None:
    """The config a pipelines/ script's @hydra.main composes, or None for a plain argparse script."""
    match = re.search(r'@hydra\.main\([^)]*config_name="(\w+)"', (ROOT / script).read_text())
    return None if match is None else match[1]


def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs of a multirun: one list of overrides per point of the product of its sweeps."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = [
        [f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override() else [line]
        for o, line in zip(parsed, overrides, strict=True)
    ]
    return [list(job) for job in itertools.product(*choices)]


def compose_job(config_name: str, overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=True)


def split_arguments(arguments: list[str]) -> tuple[str | None, list[str]]:
    """(--config-name, Hydra overrides) of a script's arguments; -m and --cfg job are dropped."""
    config_name, overrides, rest = None, [], iter(arguments)
    for argument in rest:
        if argument in ("--config-name", "-cn"):
            config_name = next(rest)
        elif argument in ("--cfg", "-c"):
            next(rest)
        elif argument in ("-m", "--multirun"):
            continue
        else:
            overrides.append(argument)
    return config_name, overrides


def all_script_commands() -> list[tuple[str, str, list[str]]]:
    return [(doc_id(path), *command) for path in DOCS for command in script_commands(path.read_text())]


def test_the_docs_show_commands():
    """The extraction finds the README's recipes (a guard against a pattern that matches nothing)."""
    readme = script_commands((ROOT / "README.md").read_text())
    assert sum(script == "pipelines/run.py" for script, _ in readme) >= 10
    assert make_commands((ROOT / "README.md").read_text())


@pytest.mark.parametrize(("doc", "script", "arguments"), all_script_commands(), ids=lambda x: str(x)[:60])
def test_a_documented_command_composes(doc: str, script: str, arguments: list[str]) -> None:
    """A pipelines/ script that the docs run exists; a Hydra one composes every job of the command (each
    point of a sweep) and, for the pipeline, passes validate_config. Files the reader supplies (a
    placeholder such as <folder>, or my_data/ of the worked example) may be missing, and only they."""
    assert (ROOT / script).is_file(), f"{doc}: {script} does not exist"
    default_config = hydra_config_name(script)
    if default_config is None:
        return
    config_name, overrides = split_arguments(arguments)
    for job in sweep_jobs(overrides):
        cfg = compose_job(config_name or default_config, job)
        if script != "pipelines/run.py":
            continue
        try:
            validate_config(cfg, job)
        except ConfigError as error:
            values = [override.split("=", 1)[1] for override in job if "=" in override]
            supplied = [value for value in values if value.startswith(USER_PATHS)]
            assert any(value in str(error) for value in supplied), f"{doc}: {job}: {error}"


def makefile_targets() -> tuple[set[str], set[str]]:
    """The Makefile's targets and the variables it lets a caller set."""
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", text, flags=re.MULTILINE))
    variables = set(re.findall(r"^([A-Z][A-Z_]*) \?=", text, flags=re.MULTILINE))
    return targets, variables


@pytest.mark.parametrize("path", DOCS, ids=doc_id)
def test_every_make_command_names_a_target(path: Path) -> None:
    targets, variables = makefile_targets()
    for words in make_commands(path.read_text()):
        for word in words:
            if "=" in word:
                assert word.split("=")[0] in variables, f"{doc_id(path)}: make {' '.join(words)}"
            else:
                assert word in targets, f"{doc_id(path)}: make {' '.join(words)}: no target {word}"


@pytest.mark.parametrize("path", DOCS, ids=doc_id)
def test_every_relative_link_resolves_inside_the_repository(path: Path) -> None:
    text = _without_code(path.read_text())
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        resolved = (path.parent / target.split("#")[0]).resolve()
        assert resolved.is_relative_to(ROOT), f"{doc_id(path)}: {target} leaves the repository"
        assert resolved.exists(), f"{doc_id(path)}: {target} does not exist"


def test_the_readme_tables_are_what_their_files_hold():
    """The README's verdict table (and any CSV table) is rendered from the committed files; on drift,
    `python pipelines/results_readme.py README.md` renders it anew."""
    text = (ROOT / "README.md").read_text()
    assert CLAIMS_BLOCK.search(text), "README.md has no generated claims table"
    assert render_blocks(text, ROOT) == text, "README.md is stale: run python pipelines/results_readme.py"
