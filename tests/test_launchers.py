"""Sweeps through Hydra's submitit launcher: the SLURM submission ``hydra/launcher=slurm`` makes, and a
2-job sweep really run by submitit's local executor, sharing its upstream stages through the store."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from directalign.store import MANIFEST

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def slurm_executor(monkeypatch):
    """submitit's SLURM executor without a cluster: it refuses to start where ``srun`` is missing, which
    is all that is faked; nothing is submitted, the sbatch file is only written out."""
    from submitit.slurm.slurm import SlurmExecutor

    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 2))


def sbatch_script(overrides: list[str], folder: Path) -> str:
    """The sbatch file submitit would submit for one job of ``-m hydra/launcher=slurm <overrides>``: the
    launcher's parameters handed to submitit's SLURM executor as the launcher hands them (submitit's
    own settings by their names, the others prefixed ``slurm_``)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", [*overrides, f"hydra.sweep.dir={folder}"], return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    del params["_target_"], params["name"]  # the job's name: Hydra sets it when it runs the job
    executor = submitit.AutoExecutor(
        cluster="slurm",
        folder=params.pop("submitit_folder"),
        slurm_max_num_timeout=params.pop("max_num_timeout"),
    )
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    return executor._executor._make_submission_file_text("python pipelines/run.py", "0")


def test_slurm_launcher_takes_nodes_tasks_and_gpus_from_the_trainer(tmp_path, slurm_executor):
    """2 nodes x 4 GPUs under trainer=fsdp: 4 tasks a node (one a GPU, as Lightning expects under SLURM),
    and the partition, account, time limit and memory of the launcher's config."""
    script = sbatch_script(
        [
            "hydra/launcher=slurm",
            "trainer=fsdp",
            "trainer.devices=4",
            "trainer.num_nodes=2",
            "hydra.launcher.partition=gpu",
            "hydra.launcher.account=lab",
        ],
        tmp_path,
    )
    lines = {line for line in script.splitlines() if line.startswith("#SBATCH")}
    expected = {"--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--account=lab"}
    expected |= {"--time=720", "--mem=64GB", "--cpus-per-task=8"}
    assert {f"#SBATCH {option}" for option in expected} <= lines
    single = sbatch_script(["hydra/launcher=slurm", "trainer=gpu"], tmp_path)
    assert "#SBATCH --nodes=1" in single and "#SBATCH --gpus-per-node=1" in single
    assert not any(
        line.startswith(("#SBATCH --partition", "#SBATCH --account")) for line in single.splitlines()
    )


@pytest.mark.slow
def test_submitit_local_sweep_runs_two_jobs_sharing_upstream_stages(tmp_path):
    """``-m hydra/launcher=submitit_local method=dpo,ipo``: submitit runs each job in a process of its own,
    both at once; SFT, the reward model and the off-policy data are computed once (the other job waits on
    the store's lock, then reuses them) and each job aligns its method (evaluation left out for time)."""
    sweep, store = tmp_path / "sweep", tmp_path / "store"
    command = [
        sys.executable,
        "pipelines/run.py",
        "-m",
        "hydra/launcher=submitit_local",
        "experiment=smoke_sweep",
        "method=dpo,ipo",
        "logger=csv",
        "task.max_examples_per_split={sft: 32, preference: 24, offpolicy: 16, eval: 8}",
        "stage.align.curve_prompts=0",
        "pipeline.stages=[sft,reward,generate,align]",
        f"paths.store={store}",
        f"hydra.sweep.dir={sweep}",
    ]
    result = subprocess.run(command, cwd=ROOT, env=os.environ, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    counts = {
        stage: len(list(store.glob(f"{stage}/*/{MANIFEST}"))) for stage in ("sft", "reward", "generate")
    }
    assert counts == {"sft": 1, "reward": 1, "generate": 1}
    assert len(list(store.glob(f"align/*/{MANIFEST}"))) == 2
    jobs = {"dpo_beta0.1_a0.0", "ipo_beta0.1_a0.0"}
    assert {p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")} == jobs
    # submitit's own records of the two jobs it ran: a result file each.
    assert len(list((sweep / ".submitit").glob("*/*_result.pkl"))) == 2
