"""Same config and seed, same numbers; another seed, other samples.

A CPU run is deterministic because every random draw comes from a seed derived from ``cfg.seed``: each
stage reseeds on entry (``StageContext.seed`` with its own offset); training shuffles and draws dropout
from (seed, epoch, batch index) (``training.ExactResume``), not from whatever state the global generator
was left in; sampling uses one seeded generator per batch; the simulated labeller uses numpy's generator
on the stage seed. CPU kernels give the same bits for the same thread count.

On GPU the seeds are the same, so data order, dropout masks and sampling draws repeat; the arithmetic
repeats only on the same GPU model and software. On an H200 (PyTorch 2.11, CUDA 13) a small Llama with the
tiny model's 49k vocabulary, trained in fp32 and in bf16 autocast on left-padded batches, gave bit-equal
weights and samples in two processes. PyTorch promises this only with ``trainer.deterministic=true`` and
``CUBLAS_WORKSPACE_CONFIG=:4096:8``: some CUDA kernels accumulate with atomics (index_add and scatter
backward, some attention backward paths) and cuBLAS may choose other algorithms under another workspace
or concurrency. Deterministic mode changes the kernels, so its numbers differ (repeatably) from the
default's; CPU and GPU, two GPU models, or two CUDA or PyTorch versions do not agree bit for bit.
"""

import pytest

from directalign.stages import GENERATE, REWARD, SFT
from directalign.stages.context import StageContext
from directalign.store import Store
from directalign.tasks import build_task
from tests.conftest import MINI_SMOKE, artifact_files, completed, compose_config, reuse_tokenizer


@pytest.mark.slow
def test_same_seed_twice_gives_the_same_summary_and_artifacts(mini_reference, mini_killed_run):
    """The second run is the kill test's: same config and seed, its own store, every stage computed
    again (three of them interrupted and resumed, which must change nothing either)."""
    second, _ = mini_killed_run
    reference = (mini_reference / "results" / "summary.csv").read_text()
    assert (second / "results" / "summary.csv").read_text() == reference
    assert artifact_files(second / "store") == artifact_files(mini_reference / "store")


@pytest.mark.slow
def test_another_seed_samples_other_completions(mini_reference, tmp_path):
    """Generation with seed 1 from the reference run's own SFT policy and reward model."""
    reuse_tokenizer(mini_reference, tmp_path)
    cfg = compose_config([*MINI_SMOKE, "seed=1"], tmp_path)
    store, reference = Store(cfg.paths.store), Store(mini_reference / "store")
    ctx = StageContext(cfg, store, build_task(cfg.task, store.root / "tasks" / cfg.task.name))
    sft, reward, seed0 = (completed(reference, stage) for stage in (SFT, REWARD, GENERATE))
    seed1 = GENERATE.run(ctx, {"sft": sft, "reward": reward})
    ours, theirs = (artifact.dataset() for artifact in (seed1, seed0))
    seed0_samples = dict(zip(theirs["id"], theirs["completion_ids"], strict=True))
    common = [
        (seed0_samples[i], c)
        for i, c in zip(ours["id"], ours["completion_ids"], strict=True)
        if i in seed0_samples
    ]
    assert len(common) > len(ours) // 2
    assert sum(a != b for a, b in common) > len(common) // 2
