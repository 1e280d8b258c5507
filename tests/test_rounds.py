"""Rounds (``pipeline.rounds``): round r >= 2 samples its own slice of the off-policy prompts from round
r - 1's policy, stores the reference's log-probs (``method.reference``: SFT's, or the sampling policy's
own) and continues training that policy. One round keeps every store key; the stages of each round are
store artifacts, so a second run reuses every round it shares."""

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import datasets
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from directalign.errors import ConfigError
from directalign.logprobs import batched_completion_logps
from directalign.pipeline import run_pipeline
from directalign.stages import ALIGN, GENERATE
from directalign.validation import validate_config
from tests.conftest import compose_config, mini_smoke_command

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pipeline.rounds=0", "pipeline.rounds=0 must be an integer >= 1"),
        ("method.reference=mirror", "method.reference='mirror' is not one of sft, previous"),
        ("stage.align.replay=all", "stage.align.replay='all' must be true or false"),
        ("pipeline.round_sampler=ref", r"pipeline.round_sampler='ref' must be one of \['policy', 'sft'\]"),
    ],
)
def test_bad_round_settings_are_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=message):
        validate_config(compose_config([override]))


def test_replay_with_a_moving_reference_is_refused():
    cfg = compose_config(["experiment=smoke", "stage.align.replay=true", "compare.copg.reference=previous"])
    with pytest.raises(ConfigError, match="stage.align.replay=true needs compare.copg.reference=sft"):
        validate_config(cfg)


def test_offline_rounds_with_a_moving_reference_are_refused():
    cfg = compose_config(["experiment=smoke", "pipeline.round_sampler=sft", "compare.dpo.reference=previous"])
    with pytest.raises(ConfigError, match="pipeline.round_sampler=sft needs compare.dpo.reference=sft"):
        validate_config(cfg)


def test_more_rounds_than_prompts_are_refused_before_any_stage(tmp_path):
    cfg = compose_config(
        ["experiment=smoke", "task.max_examples_per_split={offpolicy: 4}", "pipeline.rounds=5"], tmp_path
    )
    with pytest.raises(ConfigError, match="pipeline.rounds=5 needs at least one off-policy prompt a round"):
        run_pipeline(cfg)
    assert not list((tmp_path / "store").glob("*/*/manifest.json"))


def test_one_round_keeps_the_store_keys():
    """The reference setting and the round are in no key of round 1's stages."""
    cfg, moved = compose_config([]), compose_config(["method.reference=previous"])
    assert "reference" not in ALIGN.key_config(cfg)["method"]
    assert ALIGN.key_config(moved) == ALIGN.key_config(cfg)
    assert GENERATE.key_config(cfg) == GENERATE.key_config(moved)
    assert "round" not in cfg


def off_policy_datasets(store: Path) -> dict[tuple[str | None, str | None], datasets.Dataset]:
    """The store's off-policy datasets by (the policy that sampled them, the reference they store):
    round 1's under (None, None)."""
    found = {}
    for manifest_path in store.glob("generate/*/manifest.json"):
        manifest = json.loads(manifest_path.read_text())
        key = (manifest["upstream"].get("policy"), manifest["config"].get("method.reference"))
        found[key] = datasets.load_from_disk(str(manifest_path.parent / "data"))
    return found


@pytest.fixture(scope="module")
def two_round_store(tmp_path_factory) -> Path:
    """The reduced smoke experiment (dpo and copg) in two rounds with the SFT reference, then (up to
    alignment) with the previous round's policy as the reference, with the SFT reference and replay, and
    offline (round 2 sampled from SFT), in one store."""
    folder = tmp_path_factory.mktemp("rounds")
    for run, reference, replay, sampler in (
        ("sft", "sft", False, "policy"),
        ("previous", "previous", False, "policy"),
        ("replay", "sft", True, "policy"),
        ("offline", "sft", False, "sft"),
    ):
        # Only the first run evaluates its policies; the others are read from the store.
        last = "align,evaluate" if run == "sft" else "align"
        command = mini_smoke_command(
            folder,
            "pipeline.rounds=2",
            f"pipeline.stages=[sft,reward,generate,{last}]",
            f"compare.dpo.reference={reference}",
            f"compare.copg.reference={reference}",
            f"stage.align.replay={str(replay).lower()}",
            f"pipeline.round_sampler={sampler}",
            f"paths.results_dir={folder}/results_{run}",
            run_dir=f"hydra_{run}",
        )
        subprocess.run(command, cwd=ROOT, check=True, capture_output=True)
    return folder


def test_two_rounds_share_round_one_and_evaluate_every_round(two_round_store):
    store = two_round_store / "store"
    # Round 1: one dataset, one policy a method; round 2: a dataset a method and reference, and a policy a
    # method and run (replay trains on round 2's SFT-reference samples again, after round 1's).
    # Offline, round 2's slice is sampled once from SFT for both methods.
    assert len(list(store.glob("generate/*/manifest.json"))) == 1 + 2 * 2 + 1
    assert len(list(store.glob("replay/*/manifest.json"))) == 2
    assert len(list(store.glob("align/*/manifest.json"))) == 2 + 2 * 4
    summary = (two_round_store / "results_sft" / "summary.csv").read_text()
    for name in ("dpo_round1", "copg_round1", "dpo", "copg"):
        assert f"\n{name}," in summary


def test_a_later_round_samples_its_own_prompts_and_stores_its_reference(two_round_store):
    found = off_policy_datasets(two_round_store / "store")
    first = found.pop((None, None))
    (sft,) = [
        path.parent.relative_to(two_round_store / "store").as_posix()
        for path in (two_round_store / "store").glob("sft/*/manifest.json")
    ]
    offline = found.pop((sft, "sft"))
    policies = {policy for policy, _ in found}
    assert len(policies) == 2  # round 1's dpo and copg policies each sample round 2
    for policy in policies:
        fixed, moved = found[(policy, "sft")], found[(policy, "previous")]
        assert not set(first["id"]) & set(fixed["id"])  # a slice of the prompts of its own
        assert len(first) and len(fixed)
        # The same policy draws the same completions whatever the reference; only the stored reference
        # log-probs differ: SFT's, or the sampling policy's own.
        assert list(fixed["id"]) == list(moved["id"])
        assert list(fixed["completion_ids"]) == list(moved["completion_ids"])
        assert list(fixed["ref_logps"]) != list(moved["ref_logps"])
        # Offline, SFT samples round 2's slice of the prompts.
        assert set(offline["id"]) & set(fixed["id"]) and not set(offline["id"]) & set(first["id"])


def test_a_later_rounds_stored_sft_reference_is_sfts_log_probs(two_round_store):
    """The SFT reference a later round stores is SFT's per-token log-probs of its samples (here the smoke
    policy trains every layer, so SFT runs whole; tests/test_kl_estimate.py checks the top-layers path
    that a policy sharing SFT's trunk takes)."""
    store = two_round_store / "store"
    (sft_folder,) = [path.parent for path in store.glob("sft/*/manifest.json")]
    sft = AutoModelForCausalLM.from_pretrained(sft_folder / "model")
    pad_id = AutoTokenizer.from_pretrained(sft_folder / "model").pad_token_id
    found = off_policy_datasets(store)
    rounds = [data for (policy, reference), data in found.items() if policy and reference == "sft"]
    assert rounds
    for data in rounds:
        prompts = [row["prompt_ids"] for row in data for _ in row["completion_ids"]]
        completions = [c for row in data for c in row["completion_ids"]]
        stored = [logps for row in data for logps in row["ref_logps"]]
        whole = batched_completion_logps(sft, prompts, completions, pad_id, batch_size=8)
        for ours, theirs in zip(stored, whole, strict=True):
            assert ours == pytest.approx(theirs, abs=1e-4)


def test_replay_trains_on_every_round_so_far(two_round_store):
    """Round 2's replayed data is round 1's dataset, then round 2's own, rows and stored values intact."""
    store = two_round_store / "store"
    (first,) = [
        path.parent
        for path in store.glob("generate/*/manifest.json")
        if "policy" not in read(path)["upstream"]
    ]
    for manifest_path in store.glob("replay/*/manifest.json"):
        upstream = read(manifest_path)["upstream"]
        assert store / upstream["earlier"] == first
        earlier, latest = (
            datasets.load_from_disk(str(store / upstream[name] / "data")) for name in ("earlier", "latest")
        )
        replayed = datasets.load_from_disk(str(manifest_path.parent / "data"))
        for column in ("id", "completion_ids", "reward", "ref_logps"):
            assert list(replayed[column]) == list(earlier[column]) + list(latest[column])


def round_one_store(source: Path, target: Path) -> dict[Path, int]:
    """A copy of ``source``'s store holding round 1 alone (SFT, reward model, round 1's dataset, trunk
    and policies, models and task data); returns the copied manifests' modification times."""
    for folder in source.iterdir():
        if folder.name not in ("generate", "trunk", "align", "replay", "evaluate"):
            shutil.copytree(folder, target / folder.name)
    (first,) = [
        p.parent for p in source.glob("generate/*/manifest.json") if "policy" not in read(p)["upstream"]
    ]
    keep = [first.relative_to(source).as_posix()]
    for stage in ("trunk", "align"):
        for path in source.glob(f"{stage}/*/manifest.json"):
            upstream = read(path)["upstream"]
            if upstream.get("offpolicy") in keep and "init" not in upstream:
                keep.append(path.parent.relative_to(source).as_posix())
    for name in keep:
        shutil.copytree(source / name, target / name)
    return {path: path.stat().st_mtime_ns for path in target.glob("*/*/manifest.json")}


def test_a_run_killed_in_round_two_resumes_without_recomputing_round_one(two_round_store, tmp_path):
    before = round_one_store(two_round_store / "store", tmp_path / "store")
    assert len([p for p in before if p.parts[-3] == "align"]) == 2  # dpo's and copg's round 1
    command = mini_smoke_command(
        tmp_path, "pipeline.rounds=2", "pipeline.stages=[sft,reward,generate,align]", run_dir="hydra_killed"
    )
    with (tmp_path / "killed.log").open("w") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        # Killed as soon as round 2's first dataset starts: a second folder in generate/.
        while len([p for p in (tmp_path / "store" / "generate").iterdir() if p.is_dir()]) < 2:
            assert process.poll() is None and time.monotonic() < deadline, (
                tmp_path / "killed.log"
            ).read_text()
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()

    overrides = command[command.index("pipeline.rounds=2") :]
    resumed = subprocess.run(
        mini_smoke_command(tmp_path, *overrides, run_dir="hydra_resumed"),
        cwd=ROOT,
        capture_output=True,
        text=True,
    )

    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = {path: path.stat().st_mtime_ns for path in (tmp_path / "store").glob("*/*/manifest.json")}
    assert {path: after[path] for path in before} == before  # round 1 untouched
    assert (resumed.stdout + resumed.stderr).count("align: reusing") == 2
    round_two = [p for p in after if p.parts[-3] == "align" and "init" in read(p)["upstream"]]
    assert len(round_two) == 2


def read(manifest_path: Path) -> dict:
    return json.loads(manifest_path.read_text())
