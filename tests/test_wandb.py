"""The evaluation's wandb run, logged by real wandb in offline mode and read back from its files."""

import json
import struct
from pathlib import Path
from typing import Any

import pytest
import wandb

from directalign.prompts import Prompts
from directalign.report import PolicyResult, log_wandb, write_report
from directalign.training import wandb_run_args
from tests.conftest import compose_config

# An offline run's transaction log (run-<id>.wandb): a 7-byte file header, then 32 KiB blocks of
# records, each a 7-byte header (crc32, length, type) and a piece of a serialised Record protobuf.
BLOCK, HEADER = 32768, 7
FULL, LAST = 1, 4


def offline_records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb transaction log"
    records, position, pieces = [], HEADER, b""
    while position + HEADER <= len(data):
        left = BLOCK - position % BLOCK
        _, length, kind = struct.unpack("<IHB", data[position : position + HEADER])
        if left < HEADER or (kind == 0 and length == 0):
            position += left
            continue
        pieces += data[position + HEADER : position + HEADER + length]
        position += HEADER + length
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            records.append(record)
            pieces = b""
    return records


def read_offline_run(run_dir: Path) -> dict[str, Any]:
    """Name, group, tags, config, summary keys and chart panels of one offline run folder."""
    (log_file,) = run_dir.glob("run-*.wandb")
    run: dict[str, Any] = {"summary": {}, "config": {}, "panels": set()}
    for record in offline_records(log_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run |= {
                "name": record.run.display_name,
                "group": record.run.run_group,
                "tags": list(record.run.tags),
            }
            run["config"] |= {item.key: json.loads(item.value_json) for item in record.run.config.update}
        elif kind == "config":
            for item in record.config.update:
                if list(item.nested_key[:2]) == ["_wandb", "visualize"]:
                    run["panels"].add(item.nested_key[2])
        elif kind == "summary":
            for item in record.summary.update:
                # Media values (tables, images) arrive one field at a time: ["eval/summary", "path"].
                *parents, leaf = [item.key] if item.key else list(item.nested_key)
                node = run["summary"]
                for parent in parents:
                    node = node.setdefault(parent, {})
                node[leaf] = json.loads(item.value_json)
    return run


def fake_results() -> list[PolicyResult]:
    def samples(offset: float) -> list[dict]:
        return [
            {
                "id": f"p{i}",
                "sample": 0,
                "completion": "a headline",
                "length_tokens": 5 + i,
                "proxy_reward": offset + i / 10,
            }
            | {"gold_reward": offset / 2 + i / 20, "logratio": offset}
            for i in range(4)
        ]

    def metrics(offset: float) -> dict:
        return {
            "proxy_reward": offset + 0.15,
            "gold_reward": offset / 2 + 0.075,
            "length_tokens": 6.5,
            "kl_to_ref": offset,
            "n_prompts": 4,
            "n_samples": 1,
        }

    curve = [
        {"step": step, "proxy_reward": step / 10, "gold_reward": step / 20, "length_tokens": 6.0 + step}
        for step in (0, 4, 8)
    ]
    return [
        PolicyResult("sft", None, None, metrics(0.0), samples(0.0), policy="sft/0"),
        PolicyResult("dpo", 0.1, 0.0, metrics(0.3), samples(0.3), curve, "align/1"),
    ]


def test_evaluation_run_has_tables_plots_tags_and_group(tmp_path):
    cfg = compose_config(["logger=wandb", "logger.wandb.group=sweep-test", "method=dpo"], tmp_path)
    results = fake_results()
    examples = Prompts("eval", [[1]], ["p0"], ["An article."], ["A headline"], n_truncated=0)
    out = tmp_path / "results"
    rows = write_report(results, examples, out, seed=0)
    tags = {"stage": "evaluate", "method": "dpo", "beta": 0.1, "length_power": 0.0}
    curves = [(r.method, r.curve) for r in results if r.curve]
    run_dir = log_wandb(
        rows, curves, out, mode="offline", dir=str(tmp_path), **wandb_run_args(cfg, "evaluate", tags)
    )
    wandb.teardown()  # the wandb service writes the log asynchronously; this waits for it to finish

    run = read_offline_run(run_dir)
    assert run["name"] == "evaluate" and run["group"] == "sweep-test"
    assert {"method=dpo", "beta=0.1", "length_power=0.0", "stage=evaluate"} <= set(run["tags"])
    assert any(tag.startswith("git=") for tag in run["tags"])
    assert run["config"]["method"]["beta"] == 0.1
    summary = run["summary"]
    for key in ("eval/summary", "eval/reward_vs_step_table"):
        assert summary[key]["_type"] == "table-file", key
        table = json.loads((run_dir / "files" / summary[key]["path"]).read_text())
        assert len(table["data"]) == {"eval/summary": 2, "eval/reward_vs_step_table": 3}[key]
    assert summary["eval/dpo/proxy_reward"] == summary["eval/proxy_reward"] == pytest.approx(0.45)
    assert summary["eval/sft/kl_to_ref"] == 0.0 and summary["eval/dpo/gold_reward"] == pytest.approx(0.225)
    for plot in ("length_vs_score", "reward_vs_kl", "reward_vs_step"):
        assert summary[f"plots/{plot}"]["_type"] == "image-file", plot
    assert {
        "eval/length_vs_proxy_reward",
        "eval/length_vs_gold_reward",
        "eval/kl_vs_proxy_reward",
        "eval/kl_vs_gold_reward",
        "eval/proxy_reward_vs_step",
        "eval/gold_reward_vs_step",
    } <= run["panels"]
