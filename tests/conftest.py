"""Shared fixtures: configs composed with Hydra's compose API, shrunk to tiny sizes."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from directalign.distributed import RANK_VARIABLES
from directalign.store import MANIFEST, Artifact, Store

if TYPE_CHECKING:
    from transformers import LlamaForCausalLM

    from directalign.stages.base import Stage

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# pytest-xdist (`-n 2 --dist loadfile`, pyproject's addopts): each test file runs on one worker, so its
# module-scoped fixtures run once. The session fixtures that run whole pipelines are used from several
# files: those files form one unit (SHARED_RUNS), so that the fixture too runs once a session, not once a
# worker. Units start slowest first (SLOWEST_FIRST, by measured time), so that the last ones are short.
# (xdist's own `--dist loadgroup` would do the grouping from marks, but under pytest 9.2 it silently
# does not group: pytest-dev/pytest-xdist#1386.)
SHARED_RUNS = {
    "mini_runs": ("test_bad_inputs.py", "test_determinism.py", "test_resume.py", "test_stages.py"),
    "two_rank_runs": ("test_ddp.py", "test_fsdp.py"),
}
SLOWEST_FIRST = (
    "mini_runs",
    "two_rank_runs",
    "tests/test_pipeline_smoke.py",
    "tests/test_sampling_distribution.py",
    "tests/tasks/test_custom.py",
    "tests/test_trunk.py",
    "tests/test_sweep.py",
    "tests/test_generation.py",
    "tests/test_align.py",
    "tests/test_launchers.py",
    "tests/test_bandit.py",
    "tests/test_distributed.py",
)
UNIT_OF_FILE = {f"tests/{name}": unit for unit, names in SHARED_RUNS.items() for name in names}


def xdist_unit(nodeid: str) -> str:
    """The unit of work a test belongs to: its file, or the SHARED_RUNS fixture its file shares."""
    path = nodeid.split("::", 1)[0]
    return UNIT_OF_FILE.get(path, path)


def pytest_configure(config: pytest.Config) -> None:
    """On a pytest-xdist worker: one torch thread in the worker and in every process it starts. The tiny
    models are overhead-bound; two workers on two cores, each with two threads, would wait on each other."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Refuse a test that uses a SHARED_RUNS fixture from a file outside its unit (the fixture would run
    again on another worker); under xdist, order the items slowest unit first (stable within a unit)."""
    for item in items:
        for fixture in set(SHARED_RUNS) & set(item.fixturenames):
            if xdist_unit(item.nodeid) != fixture:
                raise pytest.UsageError(f"{item.nodeid} uses {fixture}: add its file to SHARED_RUNS")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        rank = {unit: index for index, unit in enumerate(SLOWEST_FIRST)}
        items.sort(key=lambda item: rank.get(xdist_unit(item.nodeid), len(rank)))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """`--dist loadfile` with SHARED_RUNS's files as one unit each, in the workers' (slowest first) order."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class SharedRunScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_unit(nodeid)

    config.option.loadscopereorder = False  # keep the order the workers collected: slowest unit first
    return SharedRunScheduling(config, log)


def compose_config(overrides: list[str], tmp: Path | None = None) -> DictConfig:
    """The composed app config, with every path redirected into ``tmp``."""
    paths = (
        []
        if tmp is None
        else [f"paths.store={tmp}/store", f"paths.output_dir={tmp}/out", f"paths.results_dir={tmp}/results"]
    )
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, *paths])


def tiny_llama(vocab_size: int = 64, **config: Any) -> "LlamaForCausalLM":
    """A 2-layer random Llama (seed 0, eval mode): a real transformers model that runs in milliseconds."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2}
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **shape, **heads, **config)).eval()


# LoRA adapters on the top layer of tiny_llama only, with random A and B (peft's default B = 0 would
# leave A without gradient): the headlines experiment's form of LoRA, in miniature.
TOP_LAYER_LORA = {
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj", "v_proj"],
    "layers_to_transform": [1],
    "init_lora_weights": False,
}


def step_loss_and_grads(module: Any, batch: dict) -> tuple[float, dict]:
    """One align training step's loss and the gradient of every trainable parameter (no Trainer)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer attached
        value = module.training_step(batch, 0)
    value.backward()
    return value.item(), {name: p.grad for name, p in module.named_parameters() if p.requires_grad}


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory) -> Path:
    """One store for the whole session, so the dequantised SmolLM2 tokenizer is built once."""
    return tmp_path_factory.mktemp("shared")


# The smoke experiment cut to two methods and a few dozen examples, with checkpoints every other step:
# for the end-to-end tests that run the whole pipeline more than once (determinism, kill and resume).
# Checkpoint and reward-curve steps coincide, so a resumed alignment measures the same curve points.
MINI_SMOKE = (
    "experiment=smoke",
    "logger=csv",
    "~compare.ipo",
    "~compare.avg_dpo",
    "~compare.avg_ipo",
    "~compare.avg_copg",
    "~compare.simpo",
    "task.max_examples_per_split={sft: 32, preference: 24, offpolicy: 16, eval: 8}",
    "stage.sft.epochs=2",
    "stage.sft.batch_size=8",
    "stage.sft.checkpoint_every_n_steps=2",
    "stage.reward.checkpoint_every_n_steps=1",
    "stage.align.batch_size=2",
    "stage.align.prompts_per_batch=2",
    "stage.align.checkpoint_every_n_steps=2",
    "stage.align.curve_every_n_steps=2",
    "stage.align.curve_prompts=2",
    "stage.evaluate.max_prompts=8",
)


def mini_smoke_command(folder: Path, *overrides: str, run_dir: str = "hydra") -> list[str]:
    """`pipelines/run.py` on the reduced smoke experiment, with its store and outputs in ``folder``."""
    return [
        sys.executable,
        "pipelines/run.py",
        *MINI_SMOKE,
        f"paths.store={folder}/store",
        f"paths.results_dir={folder}/results",
        f"hydra.run.dir={folder}/{run_dir}",
        *overrides,
    ]


@pytest.fixture(scope="session")
def two_rank_runs(tmp_path_factory) -> dict[str, Path]:
    """The reduced smoke experiment on 2 CPU ranks under ``trainer=ddp_cpu`` and ``trainer=fsdp_cpu``
    (same seed), side by side: their single-threaded stretches share the two cores."""
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    runs = {}
    for trainer in ("ddp_cpu", "fsdp_cpu"):
        folder = tmp_path_factory.mktemp(trainer)
        with (folder / "run.log").open("w") as log:
            command = mini_smoke_command(folder, f"trainer={trainer}")
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        runs[trainer] = (folder, process)
    for folder, process in runs.values():
        assert process.wait(timeout=900) == 0, (folder / "run.log").read_text()[-4000:]
    return {trainer: folder for trainer, (folder, _) in runs.items()}


def artifact_files(store: Path) -> dict[str, list[dict]]:
    """Each completed artifact's files (path, size, sha256) as its manifest lists them, training logs
    aside: two stores holding equal lists hold the same artifacts, bit for bit."""
    artifacts = {}
    for manifest in sorted(store.glob("*/*/manifest.json")):
        files = json.loads(manifest.read_text())["files"]
        name = f"{manifest.parent.parent.name}/{manifest.parent.name}"
        artifacts[name] = [entry for entry in files if not entry["path"].startswith("logs/")]
    return artifacts


def completed(store: Store, stage: "Stage") -> Artifact:
    """The one completed artifact of ``stage`` in a store that ran a single configuration, typed as
    the stage declares its output."""
    (manifest,) = store.root.glob(f"{stage.name}/*/{MANIFEST}")
    return store.load(stage.name, manifest.parent.name, stage.output)


def reuse_tokenizer(reference: Path, folder: Path) -> None:
    """Copy the tokenizer the reference run extracted from the GGUF file into a new store: a cache,
    not a stage artifact: the new run still computes every stage itself."""
    shutil.copytree(reference / "store" / "models", folder / "store" / "models")


# Where the pipeline is killed, one run each, in order: the store path whose appearance shows the run
# got there. A stage folder appears when its compute starts, last.ckpt once a training step is saved.
KILL_POINTS = (
    "sft/*/checkpoints/last.ckpt",
    "generate/*/",
    "align/*/checkpoints/last.ckpt",
)


@dataclass
class Attempt:
    """One run of the pipeline on the store: the manifests before and after it, its log, and the path
    (a checkpoint or a stage folder) whose appearance got it killed."""

    before: dict[Path, int]
    after: dict[Path, int]
    log: str
    killed_at: Path | None = None


def manifest_times(store: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in store.glob(f"*/*/{MANIFEST}")}


def run_killed(folder: Path, attempt: int, pattern: str) -> tuple[str, Path]:
    """Start the pipeline and SIGKILL it as soon as ``pattern`` exists in its store."""
    log_file = folder / f"attempt{attempt}.log"
    command = mini_smoke_command(folder, run_dir=f"hydra{attempt}")
    with log_file.open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 900
        while not (hits := sorted((folder / "store").glob(pattern))):
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(
                    f"attempt {attempt} ended before {pattern} appeared:\n{log_file.read_text()[-3000:]}"
                )
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
    return log_file.read_text(), hits[0]


def kill_and_finish(folder: Path) -> list[Attempt]:
    """Run the pipeline into ``folder``, SIGKILLed at each of KILL_POINTS in turn, then to the end."""
    store, attempts = folder / "store", []
    for attempt, pattern in enumerate(KILL_POINTS):
        before = manifest_times(store)
        log, killed_at = run_killed(folder, attempt, pattern)
        attempts.append(Attempt(before, manifest_times(store), log, killed_at))
    before = manifest_times(store)
    command = mini_smoke_command(folder, run_dir=f"hydra{len(KILL_POINTS)}")
    final = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert final.returncode == 0, final.stderr[-3000:]
    attempts.append(Attempt(before, manifest_times(store), final.stdout + final.stderr))
    return attempts


@pytest.fixture(scope="session")
def mini_runs(tmp_path_factory) -> tuple[Path, Path, list[Attempt]]:
    """The reduced smoke experiment twice, same seed, each in a store of its own: once uninterrupted,
    once killed at each of KILL_POINTS and then run to the end. The two run side by side: their long
    single-threaded stretches (imports, tokenising, generation loops) then share the two cores."""
    reference, killed = tmp_path_factory.mktemp("mini_reference"), tmp_path_factory.mktemp("killed")
    log_file = reference / "run.log"
    with log_file.open("w") as log:
        uninterrupted = subprocess.Popen(
            mini_smoke_command(reference), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            attempts = kill_and_finish(killed)
        finally:
            code = uninterrupted.wait(timeout=900)
    assert code == 0, log_file.read_text()[-3000:]
    return reference, killed, attempts


@pytest.fixture(scope="session")
def mini_reference(mini_runs) -> Path:
    """The uninterrupted run of the reduced smoke experiment (seed 0) that other runs are compared to."""
    return mini_runs[0]


@pytest.fixture(scope="session")
def mini_killed_run(mini_runs) -> tuple[Path, list[Attempt]]:
    """The killed and resumed run: the kill-and-resume tests check each attempt, the determinism tests
    compare its results with the reference (one run serves both, to keep `make test` short)."""
    return mini_runs[1], mini_runs[2]
