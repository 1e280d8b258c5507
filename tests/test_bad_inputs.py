"""Every bad input tried, and what the pipeline must do with it: refuse it with one line naming the key
(configs) or the split and row (data), or drop it and count it in the stage's manifest; never silently.

| bad input                             | caught by                     | outcome                         |
| ------------------------------------- | ----------------------------- | ------------------------------- |
| each row of CONFIG_ERRORS             | validate_config               | ConfigError naming the key      |
| reward model at chance on held-out    | reward stage (calibration)    | DataError naming the key        |
| `method` overridden beside `compare`  | validate_config               | ConfigError naming `compare`    |
| each row of SPLIT_ERRORS              | check_task_data (in sft.run)  | DataError: split, row, id       |
| prompt longer than the model context  | check_prompt_lengths          | DataError: split, row, id       |
| human pairs lacking a column          | human_preferences             | DataError naming the column     |
| human pair empty or identical         | human_preferences             | dropped, counted                |
| gold score NaN for a simulated pair   | simulated_preferences         | dropped, counted                |
| reward NaN or inf for a sample        | generate stage                | dropped, counted in manifest    |
| reward NaN at evaluation              | evaluate stage                | DataError: policy, row, id      |
| NaN or inf training loss              | TrainModule.on_before_backward| NonFiniteLossError, ckpt kept   |
| off-policy data with no usable pair   | align stage                   | DataError naming the dataset    |
| artifact file changed or cut short    | Store.load                    | CorruptArtifactError naming it  |
| disk full while writing a manifest    | Store.run                     | no manifest, no temporary file  |
| truncated last.ckpt (test_resume.py)  | resume_checkpoint             | removed, stage starts over      |
| each row of CUSTOM_ERRORS (own data)  | validate_config, read splits  | one line: file, column or row   |
| each row of REWARD_MODEL_ERRORS       | pretrained_reward_model       | ConfigError naming the key      |
| chat template refusing the prompt     | load_tokenizer                | ConfigError: model, roles       |
"""

import errno
import importlib.util
import os
import re
import subprocess
import sys
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from directalign import artifacts
from directalign.errors import NonFiniteLossError
from directalign.lit.base import TrainModule
from directalign.models import build_reward_model, load_tokenizer, pretrained_reward_model
from directalign.preferences import human_preferences, simulated_preferences
from directalign.stages import ALIGN, EVALUATE, GENERATE, REWARD, SFT
from directalign.stages.context import StageContext
from directalign.store import CorruptArtifactError, Store, stage_key
from directalign.tasks import build_task
from directalign.tasks.base import SPLITS, Task
from directalign.training import CHECKPOINT_DIR, LAST_CHECKPOINT, build_trainer
from directalign.validation import (
    ConfigError,
    DataError,
    check_prompt_lengths,
    check_task_data,
    validate_config,
)
from tests.conftest import (
    MINI_SMOKE,
    ROOT,
    completed,
    compose_config,
    mini_smoke_command,
    reuse_tokenizer,
    tiny_llama,
)
from tests.model_folders import NO_SYSTEM_TEMPLATE, save_policy, save_reward_model

CONFIG_ERRORS = [
    pytest.param(["method.beta=0"], r"^method\.beta=0 must be > 0$", id="beta-zero"),
    pytest.param(["method.beta=-0.1"], r"^method\.beta=-0\.1 must be > 0$", id="beta-negative"),
    pytest.param(["method.beta=abc"], r"^method\.beta='abc' must be a number$", id="beta-not-a-number"),
    pytest.param(
        ["experiment=smoke", "compare.copg.beta=0"], r"^compare\.copg\.beta=0 must be > 0$", id="compare-beta"
    ),
    pytest.param(
        ["method.length_power=1.5"],
        r"^method\.length_power=1\.5 must lie in \[0\.0, 1\.0\]$",
        id="power-over-1",
    ),
    pytest.param(
        ["method.length_power=-0.5"],
        r"^method\.length_power=-0\.5 must lie in \[0\.0, 1\.0\]$",
        id="power-below-0",
    ),
    pytest.param(
        ["experiment=smoke", "compare.copg.beta=inf"],
        r"^compare\.copg\.beta=inf must be finite$",
        id="compare-beta-infinite",
    ),
    pytest.param(
        ["stage.align.warmup_ratio=1.5"],
        r"^stage\.align\.warmup_ratio=1\.5 must lie in \[0\.0, 1\.0\]$",
        id="warmup-ratio",
    ),
    pytest.param(
        ["stage.sft.weight_decay=-0.1"], r"^stage\.sft\.weight_decay=-0\.1 must be >= 0$", id="weight-decay"
    ),
    pytest.param(
        ["task.gold.copy_penalty=inf"],
        r"^task\.gold\.copy_penalty=inf must be finite$",
        id="any-number-infinite",
    ),
    pytest.param(
        ["method=simpo", "method.gamma=nan"], r"^method\.gamma=nan must be a number$", id="simpo-gamma"
    ),
    pytest.param(
        ["method.loss=kto"], r"^method\.loss='kto' is not one of dpo, ipo, copg, simpo$", id="unknown-loss"
    ),
    pytest.param(
        ["stage.generate.sampling.temperature=0.0"],
        r"^stage\.generate\.sampling\.temperature=0\.0 must be > 0$",
        id="generate-temperature",
    ),
    pytest.param(
        ["stage.evaluate.sampling.temperature=-1"],
        r"^stage\.evaluate\.sampling\.temperature=-1 must be > 0$",
        id="eval-temperature",
    ),
    pytest.param(
        ["stage.reward.sampling.temperature=0"],
        r"^stage\.reward\.sampling\.temperature=0 must be > 0$",
        id="preference-temperature",
    ),
    pytest.param(
        ["stage.reward.label_temperature=0"],
        r"^stage\.reward\.label_temperature=0 must be > 0$",
        id="label-temperature",
    ),
    pytest.param(
        ["stage.generate.sampling.top_p=0"],
        r"^stage\.generate\.sampling\.top_p=0 must lie in \(0\.0, 1\.0\]$",
        id="top-p",
    ),
    pytest.param(
        ["stage.evaluate.sampling.batch_size=0"],
        r"^stage\.evaluate\.sampling\.batch_size=0 must be an integer >= 1$",
        id="sampling-batch-size",
    ),
    pytest.param(
        ["stage.reward.sampling.num_samples=3"],
        r"^stage\.reward\.sampling\.num_samples=3 must be 2: the simulated labeller compares a pair$",
        id="preference-samples",
    ),
    pytest.param(
        ["stage.sft.max_prompts=0"],
        r"^stage\.sft\.max_prompts=0 must be an integer >= 1 or null$",
        id="prompt-limit",
    ),
    pytest.param(
        ["experiment=headlines", "contrasts=[[copg,dpo],[copg,kto]]"],
        r"^contrasts\[1\]=\['copg', 'kto'\] must name two evaluated policies of \['sft', 'dpo', .*\]$",
        id="contrast",
    ),
    pytest.param(
        ["stage.generate.backend=sglang"],
        r"^stage\.generate\.backend='sglang' must be one of \['hf', 'vllm'\]$",
        id="backend",
    ),
    pytest.param(
        ["stage.generate.backend=vllm", "trainer=ddp_cpu"],
        r"^stage\.generate\.backend='vllm' runs one engine in one process: it needs trainer\.devices=1 and"
        r" trainer\.num_nodes=1 \(got 2 and 1\)$",
        id="vllm-ddp",
    ),
    pytest.param(
        ["stage.generate.backend=vllm"],
        r"^stage\.generate\.backend='vllm' needs the vllm package \(pip install vllm\), not installed here$",
        id="vllm-missing",
        marks=pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed"),
    ),
    pytest.param(
        ["stage.generate.sampling.num_samples=1"],
        r"^stage\.generate\.sampling\.num_samples=1 gives fewer than 2 completions per prompt$",
        id="one-completion",
    ),
    pytest.param(
        ["stage.generate.sampling.num_samples=0"],
        r"^stage\.generate\.sampling\.num_samples=0 must be an integer >= 1$",
        id="no-completion",
    ),
    pytest.param(
        ["task=tldr", "stage.generate.reward_source=gold"],
        r"^stage\.generate\.reward_source='gold' needs a task with a gold judge; task 'tldr' has none$",
        id="gold-rewards-without-a-judge",
    ),
    pytest.param(
        ["stage.generate.reward_source=oracle"],
        r"^stage\.generate\.reward_source='oracle' must be one of \['proxy', 'gold'\]$",
        id="unknown-reward-source",
    ),
    pytest.param(
        ["stage.evaluate.best_of_n=[1,0,4]"],
        r"^stage\.evaluate\.best_of_n\[1\]=0 must be an integer >= 1$",
        id="best-of-zero",
    ),
    pytest.param(
        ["stage.evaluate.sampling.num_samples=0"],
        r"^stage\.evaluate\.sampling\.num_samples=0 must be an integer >= 1$",
        id="no-evaluation-samples",
    ),
    pytest.param(
        ["method.seeds=[0,0]"],
        r"^method\.seeds=\[0, 0\] must be a non-empty list of distinct training seeds$",
        id="repeated-seed",
    ),
    pytest.param(
        [
            "experiment=smoke",
            "+claims=[{claim: x, paper: B, contrast: [copg, kto], metric: gold_reward, direction: 1}]",
        ],
        r"^claims\[0\]\.contrast=\['copg', 'kto'\] must name two evaluated policies of",
        id="claim-on-an-unknown-policy",
    ),
    pytest.param(
        [
            "experiment=smoke",
            "+claims=[{claim: x, paper: B, contrast: [copg, dpo], metric: gold, direction: 1}]",
        ],
        r"^claims\[0\]\.metric='gold' must be one of",
        id="claim-on-an-unknown-metric",
    ),
    pytest.param(
        ["task.max_completion_tokens=0"],
        r"^task\.max_completion_tokens=0 must be an integer >= 1$",
        id="no-completion-tokens",
    ),
    pytest.param(
        ["experiment=smoke", "task.max_source_tokens=450"],
        r"^task\.max_source_tokens=450 \+ task\.max_completion_tokens=16 \(\+64 for the template\) exceeds"
        r" the model's 512 positions$",
        id="no-room-in-context",
    ),
    pytest.param(
        ["stage.reward.max_length=24"],
        r"^stage\.reward\.max_length=24 leaves the reward model no room for a source next to a completion"
        r" of task\.max_completion_tokens=24$",
        id="no-room-in-reward-model",
    ),
    pytest.param(
        ["model.source=path", "+model.path=/no/such/model"],
        r"^model\.path=/no/such/model does not exist$",
        id="model-path",
    ),
    pytest.param(
        ["model.gguf_package=no-such-package"],
        r"^model: package 'no-such-package' is not installed \(run `make install`\)$",
        id="model-package",
    ),
    pytest.param(
        ["pipeline.stages=[sft,generate]"],
        r"^pipeline\.stages=\['sft', 'generate'\] must be a prefix of \['sft', 'reward', 'generate', 'align',"
        r" 'evaluate'\]$",
        id="stage-order",
    ),
    pytest.param(["seed=-1"], r"^seed=-1 must be an integer >= 0$", id="seed"),
    pytest.param(["stage.sft.lr=0"], r"^stage\.sft\.lr=0 must be > 0$", id="learning-rate"),
    pytest.param(
        ["stage.align.checkpoint_every_n_steps=0"],
        r"^stage\.align\.checkpoint_every_n_steps=0 must be an integer >= 1$",
        id="checkpoint-interval",
    ),
    pytest.param(
        ["stage.reward.validation_fraction=1.5"],
        r"^stage\.reward\.validation_fraction=1\.5 must lie in \(0\.0, 1\.0\]$",
        id="validation-fraction",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), CONFIG_ERRORS)
def test_bad_config_is_refused_in_one_line_naming_the_key(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_config(overrides, tmp_path))


def test_method_override_beside_compare_is_refused_naming_compare(tmp_path):
    overrides = ["experiment=smoke", "method.beta=0.5"]
    with pytest.raises(
        ConfigError,
        match=r"^method\.beta=0\.5: this experiment aligns the methods of `compare` \(dpo, ipo, copg,"
        r" avg_dpo, avg_ipo, avg_copg, simpo\), not `method`; override compare\.<name>\.<key> instead",
    ):
        validate_config(compose_config(overrides, tmp_path), overrides)
    allowed = ["experiment=smoke", "compare.dpo.beta=0.5"]
    validate_config(compose_config(allowed, tmp_path), allowed)


@pytest.mark.parametrize(
    ("overrides", "line"),
    [
        (["compare.dpo.beta=0"], "directalign: compare.dpo.beta=0 must be > 0"),
        (["method=copg"], "directalign: method=copg: this experiment aligns the methods of `compare`"),
    ],
    ids=["bad-value", "method-beside-compare"],
)
def test_cli_prints_the_error_line_not_a_traceback(tmp_path, overrides, line):
    command = [
        sys.executable,
        "pipelines/run.py",
        "experiment=smoke",
        *overrides,
        f"hydra.run.dir={tmp_path}",
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(line)


def example_rows(split: str, n: int = 2) -> list[dict[str, str | None]]:
    return [{"id": f"{split}{i}", "source": f"article {i}", "reference": f"headline {i}"} for i in range(n)]


class TableTask(Task):
    """A task whose splits (and human pairs) are the rows given: the smallest input for the data checks."""

    def __init__(self, splits: dict[str, list[dict]] | None = None, pairs: list[dict] | None = None):
        super().__init__(OmegaConf.create({"name": "table"}), Path("."))
        self.splits = {split: example_rows(split) for split in SPLITS} | (splits or {})
        self.pairs = pairs

    def examples(self, split: str) -> datasets.Dataset:
        return datasets.Dataset.from_list(self.splits[split])

    def human_preferences(self) -> datasets.Dataset | None:
        return datasets.Dataset.from_list(self.pairs) if self.pairs is not None else None


SPLIT_ERRORS = [
    pytest.param(
        {"sft": [{"id": "sft0", "source": "article"}]},
        r"^task 'table', split 'sft': missing column\(s\) \['reference'\]; it has \['id', 'source'\]$",
        id="missing-column",
    ),
    pytest.param(
        {"sft": [*example_rows("sft"), {"id": "x", "source": "  ", "reference": "headline"}]},
        r"^task 'table', split 'sft', row 2 \(id 'x'\): empty source$",
        id="empty-source",
    ),
    pytest.param(
        {"offpolicy": [{"id": "x", "source": None, "reference": "headline"}]},
        r"^task 'table', split 'offpolicy', row 0 \(id 'x'\): empty source$",
        id="null-source",
    ),
    pytest.param(
        {"eval": [{"id": "x", "source": "article", "reference": ""}]},
        r"^task 'table', split 'eval', row 0 \(id 'x'\): empty reference$",
        id="empty-reference",
    ),
    pytest.param(
        {"eval": [{"id": "sft1", "source": "article", "reference": "headline"}]},
        r"^task 'table', split 'eval', row 0: id 'sft1' is also row 1 of split 'sft'$",
        id="id-in-two-splits",
    ),
    pytest.param(
        {"preference": [*example_rows("preference"), *example_rows("preference", 1)]},
        r"^task 'table', split 'preference', row 2: id 'preference0' is also row 0 of split 'preference'$",
        id="id-twice-in-a-split",
    ),
]


@pytest.mark.parametrize(("splits", "message"), SPLIT_ERRORS)
def test_bad_task_data_is_refused_naming_split_and_row(splits, message):
    with pytest.raises(DataError, match=message):
        check_task_data(TableTask(splits))


def test_clean_task_data_passes():
    check_task_data(TableTask())


def test_prompt_over_the_context_is_refused_naming_the_row():
    prompts, ids = [[1] * 10, [1] * 500], ["eval0", "eval1"]
    with pytest.raises(
        DataError, match=r"^task 'table', split 'eval', row 1 \(id 'eval1'\): a prompt of 500"
    ):
        check_prompt_lengths("task 'table', split 'eval'", prompts, ids, 24, 512)
    check_prompt_lengths("task 'table', split 'eval'", prompts, ids, 12, 512)


def preference_context(task: Task) -> SimpleNamespace:
    cfg = OmegaConf.create({"task": {"name": "table"}, "stage": {"reward": {"max_prompts": None}}})
    return SimpleNamespace(task=task, cfg=cfg)


def test_human_pairs_without_a_column_are_refused():
    pairs = [{"id": "p0", "source": "article", "chosen": "good headline"}]
    with pytest.raises(DataError, match=r"preference pairs: missing column\(s\) \['rejected'\]"):
        human_preferences(preference_context(TableTask(pairs=pairs)))


def test_empty_or_identical_human_pairs_are_dropped_and_counted():
    pairs = [
        {"id": "p0", "source": "article", "chosen": "good headline", "rejected": "bad headline"},
        {"id": "p1", "source": "article", "chosen": " ", "rejected": "bad headline"},
        {"id": "p2", "source": "article", "chosen": "same", "rejected": "same"},
        {"id": "p3", "source": "", "chosen": "good headline", "rejected": "bad headline"},
    ]
    kept = human_preferences(preference_context(TableTask(pairs=pairs)))
    assert kept.chosen == ["good headline"] and kept.dropped == {"empty_or_identical": 3}


def non_finite_scorer(scorer_class):
    """A stage's Scorer whose proxy rewards are spoiled: NaN at completions 0, 5, 10..., inf at
    completions 2, 7, 12..."""

    class NonFiniteScorer(scorer_class):
        def __call__(self, sources, references, completions):
            scores = super().__call__(sources, references, completions)
            proxy = scores.proxy.copy()
            proxy[::5], proxy[2::5] = float("nan"), float("inf")
            return scores._replace(proxy=proxy)

    return NonFiniteScorer


@pytest.fixture
def mini_context(mini_reference, tmp_path) -> tuple[StageContext, Store]:
    """A context on the reduced smoke config with an empty store, and the reference run's store."""
    reuse_tokenizer(mini_reference, tmp_path)
    cfg = compose_config(list(MINI_SMOKE), tmp_path)
    store = Store(cfg.paths.store)
    ctx = StageContext(cfg, store, build_task(cfg.task, store.root / "tasks" / cfg.task.name))
    return ctx, Store(mini_reference / "store")


@pytest.mark.slow
def test_nonfinite_rewards_of_samples_are_dropped_and_counted(mini_context, monkeypatch):
    ctx, reference = mini_context
    monkeypatch.setattr(artifacts, "Scorer", non_finite_scorer(artifacts.Scorer))
    artifact = GENERATE.run(ctx, {"sft": completed(reference, SFT), "reward": completed(reference, REWARD)})
    n_sampled = len(ctx.task.examples("offpolicy")) * ctx.cfg.stage.generate.sampling.num_samples
    n_scored = n_sampled - artifact.metrics["n_empty_dropped"]
    assert artifact.metrics["n_nonfinite_dropped"] == len(range(0, n_scored, 5)) + len(range(2, n_scored, 5))
    assert np.isfinite([r for rewards in artifact.dataset()["reward"] for r in rewards]).all()


@pytest.mark.slow
def test_nonfinite_reward_at_evaluation_is_refused_naming_the_row(mini_context, monkeypatch):
    ctx, reference = mini_context
    monkeypatch.setattr(artifacts, "Scorer", non_finite_scorer(artifacts.Scorer))
    sft, reward_model = completed(reference, SFT), completed(reference, REWARD)
    # SFT's samples (its best-of-n pool) are scored in one call: NaN at 0, 5, 10..., inf at 2, 7, 12...
    evaluation = ctx.cfg.stage.evaluate
    n_scored = evaluation.max_prompts * max(evaluation.sampling.num_samples, *evaluation.best_of_n)
    n_broken = len(range(0, n_scored, 5)) + len(range(2, n_scored, 5))
    with pytest.raises(
        DataError,
        match=r"non-finite reward \(proxy nan, gold .*\) for row 0 \(id '.*'\) of split 'eval',"
        rf" and {n_broken - 1} more$",
    ):
        EVALUATE.run(ctx, {"sft": sft, "reward": reward_model, "policy": sft})


@pytest.mark.slow
def test_nonfinite_gold_scores_of_simulated_pairs_are_dropped_and_counted(mini_context, monkeypatch):
    ctx, reference = mini_context
    judge = ctx.task.gold_judge()

    def score(sources, references, completions):
        scores = judge.score(sources, references, completions)
        scores[0] = float("nan")
        return scores

    monkeypatch.setattr(ctx.task, "gold_judge", lambda: SimpleNamespace(score=score))
    pairs = simulated_preferences(ctx, completed(reference, SFT), seed=1)
    assert pairs.dropped["nonfinite_gold"] == 1
    assert np.isfinite(pairs.gold_margin).all()


@pytest.mark.slow
def test_offpolicy_data_without_a_usable_pair_is_refused_before_training(mini_context):
    """Every pair tied: preference losses have nothing to order, so align refuses in one line."""
    ctx, reference = mini_context
    rows = completed(reference, GENERATE).dataset().to_list()
    for row in rows:
        row["reward"] = [0.0] * len(row["reward"])
    tied = ctx.store.run(
        "generate",
        {"tied": True},
        {},
        lambda folder: artifacts.OffPolicyData.save(folder, rows) or {},
        kind=artifacts.OffPolicyData,
    )
    inputs = {"sft": completed(reference, SFT), "reward": completed(reference, REWARD), "offpolicy": tied}
    with pytest.raises(DataError, match=r"^align dpo: the off-policy dataset .* yields no usable pairs$"):
        ALIGN.run(ctx.for_method("dpo", ctx.cfg.compare.dpo, 0), inputs)
    assert not list(ctx.store.root.glob("align/*/manifest.json"))


class ExplodingRegression(TrainModule):
    """A regression whose loss turns non-finite at one step."""

    def __init__(self, bad_step: int, value: float):
        torch.manual_seed(0)
        stage = OmegaConf.create(
            {"epochs": 1, "lr": 0.01, "weight_decay": 0.0, "scheduler": "constant", "warmup_ratio": 0.0}
        )
        super().__init__(torch.nn.Linear(2, 1), stage)
        self.bad_step, self.value = bad_step, value

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = (self.model(batch) ** 2).mean()
        return loss * self.value if self.global_step == self.bad_step else loss


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, value):
    cfg = compose_config(["logger=none"], tmp_path)
    stage = OmegaConf.create({"epochs": 1, "checkpoint_every_n_steps": 1})
    trainer = build_trainer(cfg, stage, tmp_path, "test", {}, enable_progress_bar=False)
    with pytest.raises(
        NonFiniteLossError, match=r"^non-finite training loss \((nan|inf)\) at step 3, epoch 0:"
    ):
        trainer.fit(
            ExplodingRegression(3, value), train_dataloaders=DataLoader(torch.ones(8, 2), batch_size=1)
        )
    checkpoint = torch.load(tmp_path / CHECKPOINT_DIR / LAST_CHECKPOINT, weights_only=False)
    assert checkpoint["global_step"] == 3
    assert all(torch.isfinite(weight).all() for weight in checkpoint["state_dict"].values())


def test_changed_or_truncated_artifact_is_refused_naming_the_file(tmp_path):
    store = Store(tmp_path)
    artifact = store.run("sft", {}, {}, lambda folder: (folder / "weights.bin").write_bytes(b"1234") and {})
    (artifact.path / "weights.bin").write_bytes(b"12")
    with pytest.raises(CorruptArtifactError, match=r"weights\.bin does not match .*manifest\.json"):
        store.load("sft", artifact.key)


def test_disk_full_while_writing_a_manifest_leaves_nothing_to_trust(tmp_path, monkeypatch):
    store = Store(tmp_path)

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        store.run("sft", {}, {}, lambda folder: (folder / "weights.bin").write_bytes(b"1234") and {})
    monkeypatch.undo()
    folder = store.path("sft", stage_key("sft", {}, {}))
    assert sorted(p.name for p in folder.iterdir()) == ["weights.bin"]
    assert store.run("sft", {}, {}, lambda folder: {}).path == folder


# task=custom: the user's own files, each bad one refused before any compute (README "Your own data").
CUSTOM = ROOT / "tests" / "fixtures" / "custom"
CUSTOM_DIR = re.escape(str(CUSTOM))
CUSTOM_ERRORS = [
    pytest.param([], r"^task\.data: set exactly one of path \(local files\) or hub_id$", id="custom-no-data"),
    pytest.param(
        [f"task.data.path={CUSTOM}/no_such.jsonl"],
        rf"^task\.data\.path: {CUSTOM_DIR}/no_such\.jsonl does not exist$",
        id="custom-missing-file",
    ),
    pytest.param(
        [f"task.data.path={ROOT}/README.md"],
        r"^task\.data\.path: cannot tell the format of .*README\.md from its suffix '\.md'; set"
        r" task\.data\.builder to json, csv or parquet$",
        id="custom-unknown-suffix",
    ),
    pytest.param(
        [f"task.data.path={CUSTOM}/malformed.jsonl"],
        rf"^{CUSTOM_DIR}/malformed\.jsonl: cannot be read as json: JSON parse error: .* in row 1$",
        id="custom-malformed-file",
    ),
    pytest.param(
        [f"task.data.path={CUSTOM}/prompt_completion.jsonl", "task.columns.completion=answer"],
        rf"^{CUSTOM_DIR}/prompt_completion\.jsonl: missing column 'answer' \(task\.columns\.completion\) of"
        r" the prompt-completion format; it has \['prompt', 'completion'\]$",
        id="custom-missing-column",
    ),
    pytest.param(
        [
            f"task.data.path={CUSTOM}/prompt_completion.jsonl",
            f"task.preferences.path={CUSTOM}/prompt_completion.jsonl",
        ],
        rf"^{CUSTOM_DIR}/prompt_completion\.jsonl: missing column 'chosen' \(task\.columns\.chosen\) of the"
        r" preference format; it has \['prompt', 'completion'\]$",
        id="custom-preferences-without-pairs",
    ),
    pytest.param(
        [
            f"task.data.path={CUSTOM}/prompt_completion.jsonl",
            "task.split_fractions={sft: 0.9, preference: 0.1, offpolicy: 0.0, eval: 0.0}",
        ],
        rf"^task 'custom': split 'offpolicy' is empty \(from {CUSTOM_DIR}/prompt_completion\.jsonl \(40"
        r" examples\)\); give it a share of task\.split_fractions or a dataset split in task\.data\.splits$",
        id="custom-empty-split",
    ),
    pytest.param(
        [f"task.data.path={CUSTOM}/identical.jsonl"],
        rf"^{CUSTOM_DIR}/identical\.jsonl: none of its 6 preference pairs is usable \(each has an empty text"
        r" or chosen identical to rejected\)$",
        id="custom-all-pairs-identical",
    ),
    pytest.param(
        [f"task.data.path={CUSTOM}/system_prompt.jsonl"],
        rf"^{CUSTOM_DIR}/system_prompt\.jsonl, row 0: a conversational prompt must be one user message, got"
        r" roles \['system', 'user'\] \(set model\.system_prompt for a system prompt; multi-turn prompts are"
        r" not supported\)$",
        id="custom-system-message",
    ),
    pytest.param(
        [f"task.data.path={CUSTOM}/image_content.jsonl"],
        rf"^{CUSTOM_DIR}/image_content\.jsonl, row 0: message content is list, not text; only text messages"
        r" can be rendered$",
        id="custom-non-text-content",
    ),
    pytest.param(
        [f"task.data.path={CUSTOM}/plain.jsonl"],
        rf"^{CUSTOM_DIR}/plain\.jsonl: plain text \(column 'text'\) has no prompt; set task\.text_separator"
        r" to cut each text into a prompt and its completion$",
        id="custom-plain-text-without-separator",
    ),
]


@pytest.mark.parametrize(("overrides", "message"), CUSTOM_ERRORS)
def test_bad_custom_data_is_refused_in_one_line_before_any_compute(overrides, message, tmp_path):
    """What run_pipeline does before the first stage: validate the config, then read every split."""
    cfg = compose_config(["experiment=smoke", "task=custom", *overrides], tmp_path)
    with pytest.raises((ConfigError, DataError), match=message):
        validate_config(cfg)
        check_task_data(build_task(cfg.task, tmp_path / "cache"))


def test_cli_refuses_bad_custom_data_before_writing_to_the_store(tmp_path):
    overrides = [
        "task=custom",
        f"task.data.path={CUSTOM}/prompt_completion.jsonl",
        "task.columns.prompt=question",
    ]
    result = subprocess.run(
        mini_smoke_command(tmp_path, *overrides), cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.match(
        r"^directalign: .*prompt_completion\.jsonl: missing column 'question' \(task\.columns\.prompt\)",
        result.stderr.strip().splitlines()[-1],
    )
    assert not [path for path in (tmp_path / "store").glob("*/*") if path.parent.name != "tasks"]


# Your own models (README "Your own data"): refused in one line from their config or tokenizer alone.
def causal_lm(folder: Path) -> Path:
    tiny_llama().save_pretrained(folder)
    return folder


REWARD_MODEL_ERRORS = [
    pytest.param(
        partial(save_reward_model, num_labels=3),
        r"^reward_model\.pretrained=.*/model has 3 outputs \(labels \['LABEL_0', 'LABEL_1', 'LABEL_2'\]\); a"
        r" reward model has exactly one$",
        id="reward-model-with-three-outputs",
    ),
    pytest.param(
        causal_lm,
        r"^reward_model\.pretrained=.*/model is \['LlamaForCausalLM'\], not a sequence classifier"
        r" \(\.\.\.ForSequenceClassification with one output\)$",
        id="reward-model-not-a-classifier",
    ),
    pytest.param(
        lambda folder: folder,
        r"^reward_model\.pretrained=.*/model does not exist$",
        id="reward-model-missing-folder",
    ),
]


@pytest.mark.parametrize(("make", "message"), REWARD_MODEL_ERRORS)
def test_bad_pretrained_reward_model_is_refused_in_one_line(make, message, tmp_path):
    cfg = compose_config(["reward_model=pretrained", f"reward_model.pretrained={make(tmp_path / 'model')}"])
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)  # before any stage: from the model's config alone
    with pytest.raises(ConfigError, match=message):
        build_reward_model(cfg.reward_model, tmp_path / "unused_sft", seed=0)


def test_cli_refuses_a_bad_reward_model_or_prompt_format_before_writing_to_the_store(tmp_path, shared_store):
    reward_model = save_reward_model(tmp_path / "reward_model", num_labels=2)
    policy = save_policy(tmp_path / "policy", shared_store, chat_template=NO_SYSTEM_TEMPLATE)
    cases = {
        "reward": (
            ["reward_model=pretrained", f"reward_model.pretrained={reward_model}"],
            r"^directalign: reward_model\.pretrained=.*/reward_model has 2 outputs",
        ),
        "policy": (
            ["model.source=path", f"+model.path={policy}"],
            r"^directalign: model 'tiny_llama': the tokenizer's chat template cannot render a prompt",
        ),
    }
    for name, (overrides, message) in cases.items():
        folder = tmp_path / name
        result = subprocess.run(
            mini_smoke_command(folder, *overrides), cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 1 and "Traceback" not in result.stderr, (name, result.stderr[-2000:])
        assert re.match(message, result.stderr.strip().splitlines()[-1]), (name, result.stderr[-500:])
        assert not [path for path in (folder / "store").glob("*/*") if path.parent.name != "tasks"], name


def test_pretrained_reward_model_must_be_named():
    cfg = compose_config(["reward_model=pretrained"])
    with pytest.raises(
        ConfigError,
        match=r"^reward_model\.pretrained must name a local folder or a hub id of a reward model$",
    ):
        pretrained_reward_model(cfg.reward_model)


def test_prompt_format_the_tokenizer_cannot_render_is_refused(tmp_path, shared_store):
    folder = save_policy(tmp_path / "policy", shared_store, chat_template=NO_SYSTEM_TEMPLATE)
    cfg = compose_config(["experiment=smoke", "model.source=path", f"+model.path={folder}"], tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"^model 'tiny_llama': the tokenizer's chat template cannot render a prompt of roles"
        r" \['system', 'user'\] \(System role not supported\); set model\.system_prompt=null$",
    ):
        load_tokenizer(cfg.model, shared_store)
    cfg.model.system_prompt = None
    assert load_tokenizer(cfg.model, shared_store).chat_template == NO_SYSTEM_TEMPLATE
