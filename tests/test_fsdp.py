"""Fully sharded training (torch's FSDP2 through ``trainer=fsdp_cpu``) on 2 CPU processes over gloo.

Each training stage's module (SFT, reward model, alignment with and without LoRA, prompts shared) trains
a few steps sharded on 2 ranks and, against it, in one process with gradient accumulation over the
same two batches a step: 2 data-parallel ranks average the gradients of their batches' mean losses,
which is what accumulating ``loss / 2`` over those batches computes. The sharded run then is killed after
its first checkpoint and resumed from that sharded checkpoint. The stage tests run this file as a script
(``python tests/test_fsdp.py OUT``): Lightning starts rank 1 by rerunning that command line.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RANK_VARIABLES = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK")
SEED, VOCAB, PAD = 0, 64, 0
# Items a fit and items a rank's batch: 4 optimiser steps of 2 ranks for SFT and the reward model, 6 for
# the alignments (prompts of 3 completions each, every pair of them), checkpoints every 2 steps.
FITS = {"sft": (32, 4), "reward": (32, 4), "align": (24, 2), "align_lora": (24, 2)}
CHECKPOINT_EVERY = 2
KILLED_FIT = "align"
# The align fit again, sharded under trainer.precision=bf16-mixed.
BF16_FIT = "align_bf16"
LLAMA = {"max_position_embeddings": 64, "pad_token_id": PAD}


def stage_items(name: str) -> list[Any]:
    """Random token data in the layout each stage's collator takes (seeded: every process builds the same)."""
    import datasets
    import numpy as np

    from directalign.pairs import build_prompt_groups

    rng = np.random.default_rng(0)
    n_items, _ = FITS[name]

    def tokens(low: int, high: int) -> list[int]:
        return rng.integers(1, VOCAB, rng.integers(low, high)).tolist()

    if name == "sft":
        return [(tokens(3, 7), tokens(2, 7)) for _ in range(n_items)]
    if name == "reward":
        return [(tokens(4, 10), tokens(4, 10)) for _ in range(n_items)]
    completions = [[tokens(2, 7) for _ in range(3)] for _ in range(n_items)]
    table = datasets.Dataset.from_dict(
        {
            "prompt_ids": [tokens(3, 7) for _ in range(n_items)],
            "completion_ids": completions,
            "ref_logps": [[(-rng.random(len(c)) * 4).tolist() for c in group] for group in completions],
            "reward": [rng.normal(size=3).tolist() for _ in range(n_items)],
        }
    )
    return build_prompt_groups(table, drop_ties=name == "align")[0]


def collate_reward(rows: list[tuple[list[int], list[int]]]) -> dict:
    """Chosen and rejected token ids, right-padded, in the reward stage's batch layout."""
    import torch

    batch = {}
    for side, texts in (("chosen", [c for c, _ in rows]), ("rejected", [r for _, r in rows])):
        width = max(map(len, texts))
        ids = torch.tensor([t + [PAD] * (width - len(t)) for t in texts])
        batch[f"{side}_input_ids"], batch[f"{side}_attention_mask"] = ids, (ids != PAD).long()
    return batch


def tiny_bert():
    """A 2-layer random BERT with one output and no dropout (the reward model's form, in miniature)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    config = BertConfig(vocab_size=VOCAB, num_labels=1, pad_token_id=PAD, **shape, **no_dropout)
    return BertForSequenceClassification(config)


def stage_fit(name: str, cfg) -> tuple[Any, Any, Any]:
    """(module, rebuild, collate) of one stage: its real LightningModule and collator on a tiny model."""
    from functools import partial

    from omegaconf import OmegaConf

    from directalign.lit.align import AlignModule
    from directalign.lit.reward import RewardModule
    from directalign.lit.sft import SFTModule
    from directalign.models import with_lora
    from directalign.pairs import collate_prompt_groups
    from directalign.stages.sft import collate_examples
    from tests.conftest import TOP_LAYER_LORA, tiny_llama

    if name == "sft":
        return (
            SFTModule(tiny_llama(**LLAMA), cfg.stage.sft),
            partial(tiny_llama, **LLAMA),
            partial(collate_examples, pad_id=PAD),
        )
    if name == "reward":
        return RewardModule(tiny_bert(), cfg.stage.reward), tiny_bert, collate_reward
    lora = OmegaConf.create(TOP_LAYER_LORA) if name == "align_lora" else None

    def build():
        return with_lora(tiny_llama(**LLAMA), lora)

    loss = "dpo" if name == "align" else "copg"
    method = OmegaConf.create({"name": loss, "loss": loss, "beta": 0.1, "length_power": 0.0})
    return AlignModule(build(), cfg.stage.align, method), build, partial(collate_prompt_groups, pad_id=PAD)


def one_process_order(n_items: int, per_rank: int) -> list[int]:
    """The items of each step's two rank batches, rank 0's first: Lightning's DistributedSampler
    (shuffled with PL_GLOBAL_SEED) gives rank r the r-th of two shards."""
    from torch.utils.data import DistributedSampler

    shards = [
        list(DistributedSampler(range(n_items), num_replicas=2, rank=rank, shuffle=True, seed=SEED))
        for rank in range(2)
    ]
    return [
        i for start in range(0, len(shards[0]), per_rank) for s in shards for i in s[start : start + per_rank]
    ]


def train_stages(out: Path, sharded: bool, fits: list[str]) -> None:
    """Fit each of ``fits`` into ``out/<fit>`` (skipping one whose model is saved): its merged model, and
    every rank's per-batch losses. Sharded on 2 ranks, or one process accumulating 2 batches a step."""
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader

    from directalign.models import merge_lora
    from directalign.training import fit_stage
    from tests.conftest import compose_config

    trainer = ["trainer=fsdp_cpu"] if sharded else ["trainer=cpu", "+trainer.accumulate_grad_batches=2"]
    stages = {
        f"stage.{stage}.{key}={value}"
        for stage in ("sft", "reward", "align")
        for key, value in (("epochs", 1), ("lr", 1e-3), ("checkpoint_every_n_steps", CHECKPOINT_EVERY))
    }
    overrides = [*trainer, "logger=none", *sorted(stages), "stage.align.share_prompt=true"]
    configs = {"": compose_config(overrides, out)}
    if sharded:
        configs["_bf16"] = compose_config([*overrides, "trainer.precision=bf16-mixed"], out)

    class Losses(Callback):
        def __init__(self):
            self.values: list[float] = []

        def on_train_batch_end(self, trainer, module, *args) -> None:
            self.values.append(float(trainer.callback_metrics["train/loss"]))

    for name in fits:
        base = name.removesuffix("_bf16")
        cfg = configs[name.removeprefix(base)]
        n_items, per_rank = FITS[base]
        folder = out / name
        if (folder / "model" / "config.json").is_file():
            continue
        module, rebuild, collate = stage_fit(base, cfg)
        items = stage_items(base)
        L.seed_everything(SEED, verbose=False)
        if sharded:
            loader = DataLoader(items, batch_size=per_rank, shuffle=True, collate_fn=collate)
        else:
            order = one_process_order(n_items, per_rank)
            loader = DataLoader(items, batch_size=per_rank, sampler=order, collate_fn=collate)
        losses = Losses()
        stage_cfg = cfg.stage[base.removesuffix("_lora")]
        trainer, model = fit_stage(
            cfg, stage_cfg, folder, module, rebuild, name, {}, loader, callbacks=[losses]
        )
        (folder / f"losses_rank{trainer.global_rank}.json").write_text(json.dumps(losses.values))
        if model is not None:
            merge_lora(model).save_pretrained(folder / "model")
        trainer.strategy.barrier()


def run_script(out: Path, *fits: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARIABLES}
    return subprocess.Popen(
        [sys.executable, str(Path(__file__)), str(out), *fits],
        cwd=ROOT,
        env=env | {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # rank 1 joins rank 0's process group: one kill ends both
    )


def finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-4000:]


def rank_losses(folder: Path) -> list[float]:
    """The losses of every step's two batches in order, rank 0's first."""
    ranks = [json.loads((folder / f"losses_rank{rank}.json").read_text()) for rank in range(2)]
    return [loss for step in zip(*ranks, strict=True) for loss in step]


def weights(folder: Path) -> dict:
    """The saved model's weights, loaded as a user would: ``from_pretrained`` of its folder."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kind = AutoModelForSequenceClassification if folder.name == "reward" else AutoModelForCausalLM
    return kind.from_pretrained(folder / "model").state_dict()


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> dict[str, Path]:
    """The stages trained sharded on 2 ranks; ``KILLED_FIT`` again, killed (SIGKILL, both ranks) once it
    wrote its first sharded checkpoint and then rerun to the end; and the stages in one process. The
    runs go side by side: their single-threaded stretches (imports, Lightning's loops) share the cores."""
    root = tmp_path_factory.mktemp("fsdp")
    runs = {name: root / name for name in ("sharded", "killed", "one")}
    uninterrupted, killed = (
        run_script(runs["sharded"], *FITS, BF16_FIT),
        run_script(runs["killed"], KILLED_FIT),
    )
    checkpoint = runs["killed"] / KILLED_FIT / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 600
    while not checkpoint.is_dir():
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()[0][-4000:]
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    assert not (runs["killed"] / KILLED_FIT / "model").exists(), "killed after the fit ended: nothing resumed"
    resumed = run_script(runs["killed"], KILLED_FIT)
    train_stages(runs["one"], sharded=False, fits=list(FITS))
    finish(uninterrupted)
    finish(resumed)
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(FITS))
def test_sharded_stage_matches_one_process(fsdp_runs, stage):
    """Same per-batch losses and saved weights as one process. Tolerance: every loss and weight within
    1e-5 (relative) plus 1e-6 (absolute), after 4-6 AdamW steps at lr 1e-3 from the same init: float32
    sums in another order (the ranks' gradients are averaged by a reduce-scatter, not accumulated)."""
    import torch

    sharded, one = fsdp_runs["sharded"] / stage, fsdp_runs["one"] / stage
    n_items, per_rank = FITS[stage]
    losses = rank_losses(sharded)
    assert len(losses) == n_items // per_rank
    torch.testing.assert_close(
        losses, json.loads((one / "losses_rank0.json").read_text()), rtol=1e-5, atol=1e-6
    )
    mine, reference = weights(sharded), weights(one)
    assert mine.keys() == reference.keys()
    from tests.conftest import tiny_llama

    initial = (tiny_bert() if stage == "reward" else tiny_llama(**LLAMA)).state_dict()
    moved = sum(float((w - initial[n]).abs().sum()) for n, w in reference.items())
    assert moved > 0.1, "the weights barely moved: the comparison would prove nothing"
    for name, weight in reference.items():
        torch.testing.assert_close(mine[name], weight, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_killed_sharded_run_resumes_from_its_sharded_checkpoint_to_the_same_weights(fsdp_runs):
    """The killed fit resumed mid-fit from a sharded checkpoint (a folder of one shard a rank), trained
    the remaining batches to the same losses and ended with the same weights, bit for bit."""
    import torch

    killed, reference = fsdp_runs["killed"] / KILLED_FIT, fsdp_runs["sharded"] / KILLED_FIT
    resumed, full = rank_losses(killed), rank_losses(reference)
    assert 0 < len(resumed) < len(full) and len(resumed) % (2 * CHECKPOINT_EVERY) == 0
    assert resumed == full[len(full) - len(resumed) :]
    mine, theirs = weights(killed), weights(reference)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[name], weight) for name, weight in theirs.items())


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    train_stages(Path(sys.argv[1]), sharded=True, fits=sys.argv[2:])


@pytest.mark.slow
def test_bf16_mixed_computes_the_sharded_layers_in_bf16_and_keeps_float32_weights(fsdp_runs):
    """``trainer.precision=bf16-mixed`` is FSDP2's MixedPrecisionPolicy: the layers compute in bf16, so the
    losses leave float32's by far more than float32's noise yet stay within bf16's precision (2^-8
    relative: 2e-2 over 6 steps); the weights the optimiser updates, and those saved, are float32."""
    import torch

    bf16, fp32 = (rank_losses(fsdp_runs["sharded"] / fit) for fit in (BF16_FIT, "align"))
    torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=0)
    assert max(abs(a - b) for a, b in zip(bf16, fp32, strict=True)) > 1e-4
    assert {w.dtype for w in weights(fsdp_runs["sharded"] / BF16_FIT).values()} == {torch.float32}


def test_bf16_mixed_has_store_keys_of_its_own_and_other_precisions_are_refused(tmp_path):
    """Every training stage's key holds the precision: a bf16 run never reuses a float32 artifact. Under
    FSDP, Lightning itself runs in float32 (no autocast: FSDP2 casts per layer)."""
    import torch

    from directalign.errors import ConfigError
    from directalign.sharding import FullyShardedStrategy
    from directalign.stages import ALIGN, REWARD, SFT
    from directalign.training import build_trainer
    from tests.conftest import compose_config

    fp32, bf16 = (
        compose_config(
            ["experiment=smoke", "trainer=fsdp_cpu", "logger=none", f"trainer.precision={p}"], tmp_path
        )
        for p in ("32-true", "bf16-mixed")
    )
    for stage in (SFT, REWARD, ALIGN):
        assert stage.key_config(fp32) != stage.key_config(bf16), stage.name
    trainer = build_trainer(bf16, bf16.stage.sft, tmp_path, "bf16", {})
    assert trainer.strategy.mixed_precision.param_dtype == torch.bfloat16
    assert trainer.precision == "32-true"
    with pytest.raises(ConfigError, match="trainer.precision=16-mixed"):
        FullyShardedStrategy(precision="16-mixed")


def summary(folder: Path) -> dict[str, dict[str, str]]:
    import csv

    with (folder / "results" / "summary.csv").open() as handle:
        return {row["method"]: row for row in csv.DictReader(handle)}


@pytest.mark.slow
def test_sharded_pipeline_matches_the_data_parallel_one(two_rank_runs):
    """``pipelines/run.py`` (the reduced smoke experiment) under fsdp_cpu against ddp_cpu: the same 2 ranks
    and batches, unsharded (test_ddp.py shows DDP equals one process with the same global batch; one
    process at the same per-device batch sizes would train other batches and sample other streams).
    Every sample is the same: the off-policy completions, and every policy's gold reward, length and wins.
    Tolerances: SFT's and the reward model's saved weights within 1e-5; proxy rewards within 1e-6; KL to
    SFT within 2e-3, because on the smoke task's near-equal rewards CoPG's gradients are float noise
    that AdamW's normalised steps turn into lr-sized moves (its aligned weights differ by up to 4e-4 after
    4 steps at lr 1e-4, and its KL by 1e-3; DPO's by 1e-6)."""
    import torch
    from safetensors.torch import load_file

    from directalign.stages import GENERATE
    from directalign.store import Store
    from tests.conftest import completed

    sharded, reference = two_rank_runs["fsdp_cpu"] / "store", two_rank_runs["ddp_cpu"] / "store"
    for stage in ("sft", "reward"):
        (model,) = sharded.glob(f"{stage}/*/model/model.safetensors")
        mine, theirs = load_file(model), load_file(reference / model.relative_to(sharded))
        assert mine.keys() == theirs.keys()
        for name, weight in theirs.items():
            torch.testing.assert_close(mine[name], weight, rtol=0, atol=1e-5, msg=f"{stage} {name}")
    mine, theirs = (completed(Store(store), GENERATE).dataset() for store in (sharded, reference))
    assert mine["completion_ids"] == theirs["completion_ids"]
    rows, reference_rows = summary(sharded.parent), summary(reference.parent)
    assert rows.keys() == reference_rows.keys()
    for method, row in reference_rows.items():
        for column in ("gold_reward", "length_tokens", "wins", "ties", "losses"):
            assert rows[method][column] == row[column], (method, column)
        for column, tolerance in (("proxy_reward", 1e-6), ("kl_to_ref", 2e-3)):
            assert abs(float(rows[method][column]) - float(row[column])) <= tolerance, (method, column)


def test_frozen_trunk_is_turned_off_under_fsdp_with_one_log_line(tmp_path, caplog):
    """The trunk cache runs the policy's own layers outside the Trainer, unsharded: under trainer=fsdp
    every align step runs the whole (sharded) model instead, which one log line says. Prompt sharing
    stays on: the sharded align fits above train with it."""
    import logging

    from directalign.stages.context import StageContext
    from directalign.stages.trunk import align_first_layer
    from directalign.store import Store
    from tests.conftest import compose_config

    cfg = compose_config(["experiment=smoke", "trainer=fsdp_cpu", "logger=none"], tmp_path)
    assert cfg.stage.align.frozen_trunk and cfg.stage.align.group_by_prompt and cfg.stage.align.share_prompt
    with caplog.at_level(logging.INFO, logger="directalign.stages.trunk"):
        assert align_first_layer(StageContext(cfg, Store(tmp_path / "store"), task=None), sft=None) is None
    (record,) = caplog.records
    assert (
        record.getMessage().startswith("trunk: not cached")
        and "trainer.strategy auto or ddp" in record.getMessage()
    )
