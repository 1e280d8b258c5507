"""Data parallelism: the store's rank protocol, and real DDP on 2 CPU processes (gloo).

The DDP test runs this file as a script (`python tests/test_ddp.py OUT DEVICES BATCH`): Lightning's
launcher starts rank 1 by rerunning that command line, as it reruns `pipelines/run.py` in a pipeline.
"""

import os
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
from filelock import FileLock

from directalign.distributed import is_rank_zero
from directalign.store import MANIFEST, Ranks, RankWaitTimeout, Store, stage_key

ROOT = Path(__file__).resolve().parents[1]
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")
N_PAIRS, BATCH, SEED = 48, 4, 0
# The tiny Llama of these tests: 64 positions, pad id 0 (tests/conftest.py builds it).
LLAMA = {"max_position_embeddings": 64, "pad_token_id": 0}


@pytest.fixture
def clean_rank_env(monkeypatch):
    for name in RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("name", RANK_VARIABLES)
def test_rank_read_from_torchrun_slurm_and_lightning_variables(clean_rank_env, name):
    assert is_rank_zero()
    clean_rank_env.setenv(name, "0")
    assert is_rank_zero()
    clean_rank_env.setenv(name, "1")
    assert not is_rank_zero()


def write_file(folder):
    (folder / "out.txt").write_text("rank 0")
    return {"value": 1}


def test_other_rank_joins_a_training_stage_without_the_lock_and_never_writes(tmp_path, clean_rank_env):
    """Rank 0 holds the lock through trainer.fit; rank 1 must compute alongside it, then wait."""
    store = Store(tmp_path, poll_interval_s=0.05)
    key = stage_key("align", {"lr": 1}, {})
    folder = store.path("align", key)
    folder.parent.mkdir(parents=True)
    joined, result = threading.Event(), {}

    def rank_one_compute(path):
        joined.set()
        return {"ignored": True}

    def rank_one():
        result["artifact"] = store.run("align", {"lr": 1}, {}, rank_one_compute, ranks=Ranks.COLLECTIVE)

    clean_rank_env.setenv("LOCAL_RANK", "1")
    with FileLock(str(folder) + ".lock"):
        thread = threading.Thread(target=rank_one)
        thread.start()
        assert joined.wait(10), "rank 1 blocked on the lock rank 0 holds"
    clean_rank_env.delenv("LOCAL_RANK")
    time.sleep(0.2)
    assert thread.is_alive(), "rank 1 returned before rank 0 wrote the manifest"
    assert not (folder / MANIFEST).exists()
    rank_zero = store.run("align", {"lr": 1}, {}, write_file, ranks=Ranks.COLLECTIVE)
    thread.join(10)
    assert result["artifact"].key == rank_zero.key
    assert result["artifact"].metrics == {"value": 1}, "rank 1's metrics must not reach the manifest"


def test_other_rank_waits_for_a_non_training_stage_and_times_out_clearly(tmp_path, clean_rank_env):
    clean_rank_env.setenv("RANK", "1")
    store = Store(tmp_path, wait_timeout_s=0.3, poll_interval_s=0.05)
    calls = []
    with pytest.raises(RankWaitTimeout, match="rank 0 to write .*generate"):
        store.run("generate", {"n": 1}, {}, lambda folder: calls.append(folder) or {})
    assert calls == [], "only rank 0 generates"
    assert not list(tmp_path.rglob("*.lock")) and not list(tmp_path.rglob(MANIFEST))


def test_other_rank_reuses_a_completed_artifact(tmp_path, clean_rank_env):
    store = Store(tmp_path)
    done = store.run("generate", {"n": 1}, {}, write_file)
    clean_rank_env.setenv("SLURM_PROCID", "3")
    assert store.run("generate", {"n": 1}, {}, pytest.fail).path == done.path


def test_per_rank_seed_gives_other_ranks_their_own_noise_and_leaves_rank_zero_alone():
    import torch

    from directalign.training import PerRankSeed

    seeds = {}
    for rank in (0, 1, 2):
        torch.manual_seed(1234)  # what ExactResume sets before every batch, the same on every rank
        PerRankSeed().on_train_batch_start(SimpleNamespace(global_rank=rank), None)
        seeds[rank] = torch.initial_seed()
    assert seeds[0] == 1234 and len(set(seeds.values())) == 3


def two_rank_order(batch_size: int) -> list[int]:
    """The pairs of each global step of 2 ranks (batch_size each), concatenated: Lightning's
    DistributedSampler (shuffled with PL_GLOBAL_SEED) gives rank r the r-th of its two shards."""
    from torch.utils.data import DistributedSampler

    shards = [
        list(DistributedSampler(range(N_PAIRS), num_replicas=2, rank=rank, shuffle=True, seed=SEED))
        for rank in range(2)
    ]
    return [
        i
        for start in range(0, len(shards[0]), batch_size)
        for shard in shards
        for i in shard[start : start + batch_size]
    ]


def align_once(out: Path, devices: int, batch_size: int) -> None:
    """Align a tiny random Llama on synthetic pairs with the real AlignModule, collator and Trainer."""
    import lightning as L
    import numpy as np
    import torch
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader

    sys.path.insert(0, str(ROOT))
    from directalign.lit.align import AlignModule
    from directalign.pairs import collate_pairs
    from directalign.training import build_trainer
    from tests.conftest import compose_config, tiny_llama

    strategy = "ddp" if devices > 1 else "auto"
    cfg = compose_config(
        [
            "trainer=ddp_cpu",
            f"trainer.devices={devices}",
            f"trainer.strategy={strategy}",
            "logger=none",
            f"stage.align.batch_size={batch_size}",
            "stage.align.lr=1e-3",
        ],
        out,
    )
    collate = partial(collate_pairs, pad_id=0)
    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(N_PAIRS):
        prompt = rng.integers(1, 64, rng.integers(3, 7)).tolist()
        a, b = (rng.integers(1, 64, rng.integers(2, 7)).tolist() for _ in range(2))
        pairs.append(
            {
                "prompt": prompt,
                "a": a,
                "b": b,
                "ref_a": (-rng.random(len(a)) * 4).tolist(),
                "ref_b": (-rng.random(len(b)) * 4).tolist(),
                "reward_a": float(rng.normal()),
                "reward_b": float(rng.normal()),
            }
        )
    L.seed_everything(SEED)
    if devices > 1:
        # As in the align stage: Lightning swaps the shuffling sampler for a DistributedSampler.
        loader = DataLoader(pairs, batch_size=batch_size, shuffle=True, collate_fn=collate)
    else:
        loader = DataLoader(
            pairs, batch_size=batch_size, sampler=two_rank_order(batch_size // 2), collate_fn=collate
        )
    model = tiny_llama(**LLAMA)
    method = OmegaConf.create({"name": "avg_copg", "loss": "copg", "beta": 0.1, "length_power": 1.0})
    trainer = build_trainer(cfg, cfg.stage.align, out, "ddp-test", {}, enable_progress_bar=False)
    trainer.fit(AlignModule(model, cfg.stage.align, method), train_dataloaders=loader)
    if trainer.is_global_zero:
        torch.save({"steps": trainer.global_step, "weights": model.state_dict()}, out / "final.pt")


@pytest.mark.slow
def test_align_on_two_ranks_matches_one_rank_with_the_same_global_batch(tmp_path):
    """2 ranks x batch 4 == 1 rank x batch 8: DDP averages the ranks' mean losses' gradients, which is
    the gradient of the mean over the global batch. Tolerance: every weight within 1e-5 (relative)
    plus 1e-6 (absolute) of the one-rank run, 6 AdamW steps at lr 1e-3 from the same init."""
    import torch

    from tests.conftest import tiny_llama

    two, one = tmp_path / "two", tmp_path / "one"
    env = os.environ | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, str(Path(__file__)), str(two), "2", str(BATCH)],
        cwd=ROOT,
        env={k: v for k, v in env.items() if k not in RANK_VARIABLES},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    align_once(one, 1, 2 * BATCH)
    ddp, single = torch.load(two / "final.pt"), torch.load(one / "final.pt")
    assert ddp["steps"] == single["steps"] == N_PAIRS // (2 * BATCH)
    initial = tiny_llama(**LLAMA).state_dict()
    moved = sum(float((w - initial[n]).abs().sum()) for n, w in single["weights"].items())
    assert moved > 1.0, "the weights barely moved: the comparison would prove nothing"
    for name, weight in single["weights"].items():
        torch.testing.assert_close(ddp["weights"][name], weight, rtol=1e-5, atol=1e-6, msg=name)


if __name__ == "__main__":
    align_once(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["ddp_cpu", "fsdp_cpu"])
def test_pipeline_on_two_ranks_shards_sampling_and_only_rank_zero_writes(two_rank_runs, trainer):
    """The reduced smoke pipeline under real DDP and under FSDP (2 CPU processes, gloo): it completes,
    the sampling stages ran on both ranks (the generate manifest records a world of 2, and evaluation
    too), and the store holds exactly one artifact per stage configuration (rank 1 never wrote one)."""
    import json

    folder = two_rank_runs[trainer]
    store = folder / "store"
    (generate,) = store.glob(f"generate/*/{MANIFEST}")
    assert json.loads(generate.read_text())["metrics"]["world_size"] == 2
    evaluations = sorted(store.glob(f"evaluate/*/{MANIFEST}"))
    assert [json.loads(m.read_text())["metrics"]["world_size"] for m in evaluations] == [2, 2, 2]
    with (folder / "results" / "summary.csv").open() as handle:
        rows = [row.split(",")[0] for row in handle.read().splitlines()[1:]]
        assert rows == ["sft", "dpo", "copg", "best_of_1", "best_of_2", "best_of_4"]
    stages = ("sft", "reward", "generate", "align")
    folders = {stage: len(list(store.glob(f"{stage}/*/"))) for stage in stages}
    assert folders == {"sft": 1, "reward": 1, "generate": 1, "align": 2}
