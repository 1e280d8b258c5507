"""The store contract: skip on rerun, no manifest after a crash, keys follow upstream config."""

import json
import subprocess
import sys
import time

import pytest

from directalign.store import MANIFEST, CorruptArtifactError, Store, stage_key
from tests.conftest import ROOT


def write_file(folder, name="out.txt", text="hello"):
    (folder / name).write_text(text)
    return {"value": 1}


def test_rerun_skips_completed_stage(tmp_path):
    store = Store(tmp_path)
    calls = []

    def compute(folder):
        calls.append(folder)
        return write_file(folder)

    first = store.run("sft", {"lr": 1}, {}, compute)
    second = store.run("sft", {"lr": 1}, {}, compute)
    assert len(calls) == 1
    assert first.key == second.key and second.metrics == {"value": 1}
    manifest = json.loads((first.path / MANIFEST).read_text())
    assert manifest["files"] == [{"path": "out.txt", "size": 5, "sha256": manifest["files"][0]["sha256"]}]


def test_crash_leaves_no_manifest_and_rerun_recomputes(tmp_path):
    store = Store(tmp_path)

    def crash(folder):
        (folder / "partial.txt").write_text("half")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.run("sft", {"lr": 1}, {}, crash)
    key = stage_key("sft", {"lr": 1}, {})
    assert not (store.path("sft", key) / MANIFEST).exists()
    assert store.load("sft", key) is None
    seen = []

    def resume(folder):
        seen.append((folder / "partial.txt").read_text())
        return write_file(folder)

    store.run("sft", {"lr": 1}, {}, resume)
    assert seen == ["half"], "a rerun works in the same folder, so it can resume from what was left"


def test_key_changes_with_upstream_not_with_downstream(tmp_path):
    store = Store(tmp_path)
    sft_a = store.run("sft", {"lr": 1}, {}, write_file)
    sft_b = store.run("sft", {"lr": 2}, {}, write_file)
    reward_a = store.run("reward", {"x": 0}, {"sft": sft_a}, write_file)
    reward_b = store.run("reward", {"x": 0}, {"sft": sft_b}, write_file)
    assert sft_a.key != sft_b.key
    assert reward_a.key != reward_b.key
    align_dpo = store.run("align", {"method": "dpo"}, {"sft": sft_a, "reward": reward_a}, write_file)
    align_copg = store.run("align", {"method": "copg"}, {"sft": sft_a, "reward": reward_a}, write_file)
    assert align_dpo.key != align_copg.key
    assert store.run("sft", {"lr": 1}, {}, write_file).key == sft_a.key


def test_the_same_artifact_in_two_roles_is_two_inputs(tmp_path):
    """The SFT baseline's evaluation takes the SFT policy as both reference and evaluated policy."""
    store = Store(tmp_path)
    sft = store.run("sft", {}, {}, write_file)
    other = store.run("sft", {"lr": 2}, {}, write_file)
    both = stage_key("evaluate", {}, {"sft": sft, "policy": sft})
    assert both != stage_key("evaluate", {}, {"sft": sft, "policy": other})
    assert both != stage_key("evaluate", {}, {"sft": sft})


def test_scratch_checkpoints_removed_on_completion(tmp_path):
    store = Store(tmp_path)

    def compute(folder):
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "last.ckpt").write_text("x")
        return write_file(folder)

    artifact = store.run("sft", {}, {}, compute, scratch=("checkpoints",))
    assert not (artifact.path / "checkpoints").exists()


def test_tampered_file_is_refused(tmp_path):
    store = Store(tmp_path)
    artifact = store.run("sft", {}, {}, write_file)
    (artifact.path / "out.txt").write_text("HELLO")
    with pytest.raises(CorruptArtifactError, match="out.txt"):
        store.load("sft", artifact.key)


def test_manifest_states_the_stage_wall_time_and_stage_times_sums_it(tmp_path):
    store = Store(tmp_path)

    def slow(folder):
        time.sleep(0.3)
        return write_file(folder)

    first = store.run("sft", {"lr": 1}, {}, slow)
    reward = store.run("reward", {"lr": 2}, {"sft": first}, lambda f: write_file(f) | {"val_accuracy": 0.75})
    assert json.loads((first.path / MANIFEST).read_text())["wall_seconds"] >= 0.3
    out = tmp_path / "facts"
    time_log = tmp_path / "time.log"
    time_log.write_text(
        'make: done\n\tCommand being timed: "make reproduce"\n\tUser time (seconds): 5.0\n'
        "\tElapsed (wall clock) time (h:mm:ss or m:ss): 58:31.21\n"
        "\tMaximum resident set size (kbytes): 10800000\n\tExit status: 0\n"
    )
    script = [sys.executable, str(ROOT / "pipelines" / "stage_times.py"), str(tmp_path), "--out", str(out)]
    table = subprocess.run(
        [*script, "--time-log", str(time_log)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"| sft | {first.key} | 0 |" in table and "| all | 2 |  |  | 0.0 |" in table
    assert (out / "stage_times.csv").read_text().splitlines() == [
        "stage,runs,shortest_s,longest_s,total_min",
        "sft,1,0,0,0.0",
        "reward,1,0,0,0.0",
        "all,2,,,0.0",
    ]
    assert (out / "reward_model.csv").read_text().splitlines()[1] == f"{reward.key[:12]},val_accuracy,0.75"
    assert (out / "run.csv").read_text().splitlines() == [
        "field,value",
        "command,make reproduce",
        "wall_clock,58:31.21",
        "peak_rss_kb,10800000",
        "exit_status,0",
    ]
    time_log.write_text("Exit status: 0\n")
    refused = subprocess.run([*script, "--time-log", str(time_log)], capture_output=True, text=True)
    assert refused.returncode != 0
    assert "not a `/usr/bin/time -v` log (no 'Command being timed' line)" in refused.stderr
