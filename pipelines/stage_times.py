"""Wall time of every stage computed into a store, from the manifests (``wall_seconds``), oldest first,
and the total per stage: `python pipelines/stage_times.py [store] [--out DIR]` (default ./store). From an
empty store these are one run's stage times, the budget of an experiment. `--out DIR` also writes
``stage_times.csv`` (per stage: runs, shortest, longest, total) and ``reward_model.csv`` (the held-out
statistics of every reward model in the store), the files results/README.md renders its numbers from.
`--time-log FILE` (with `--out`) adds ``run.csv``: the command, wall time and peak memory that
`/usr/bin/time -v` wrote for the whole run.
"""

import argparse
import csv
import json
import math
from collections import defaultdict
from pathlib import Path

# The lines of `/usr/bin/time -v` that run.csv keeps, by the name it gives each.
TIME_FIELDS = {
    "command": "Command being timed",
    "wall_clock": "Elapsed (wall clock) time (h:mm:ss or m:ss)",
    "peak_rss_kb": "Maximum resident set size (kbytes)",
    "exit_status": "Exit status",
}


def write_rows(path: Path, header: list[str], rows: list[list]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def timed_run(log: Path) -> list[list[str]]:
    """The ``TIME_FIELDS`` of a `/usr/bin/time -v` log as (field, value) rows; a missing one is refused."""
    values = {}
    for line in log.read_text(errors="replace").splitlines():
        label, _, value = line.strip().rpartition(": ")
        values.setdefault(label, value.strip().strip('"'))
    missing = [label for label in TIME_FIELDS.values() if label not in values]
    if missing:
        raise SystemExit(f"{log}: not a `/usr/bin/time -v` log (no {missing[0]!r} line)")
    return [[name, values[label]] for name, label in TIME_FIELDS.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path, nargs="?", default=Path("store"))
    parser.add_argument("--out", type=Path, help="write stage_times.csv and reward_model.csv here")
    parser.add_argument("--time-log", type=Path, help="a `/usr/bin/time -v` log of the run: adds run.csv")
    args = parser.parse_args()
    if args.time_log and not args.out:
        parser.error("--time-log needs --out")
    run = timed_run(args.time_log) if args.time_log else None
    paths = sorted(args.store.glob("*/*/manifest.json"), key=lambda p: p.stat().st_mtime)
    manifests = [json.loads(p.read_text()) for p in paths]
    totals: dict[str, list[float]] = defaultdict(list)
    print("| stage | key | wall s |\n|---|---|---|")
    for manifest in manifests:
        seconds = manifest.get("wall_seconds")
        if seconds is None:
            continue
        totals[manifest["stage"]].append(seconds)
        print(f"| {manifest['stage']} | {manifest['key']} | {seconds:.0f} |")
    rows = [
        [stage, len(times), round(min(times)), round(max(times)), round(sum(times) / 60, 1)]
        for stage, times in totals.items()
    ]
    rows.append(
        ["all", sum(map(len, totals.values())), "", "", round(sum(map(sum, totals.values())) / 60, 1)]
    )
    header = ["stage", "runs", "shortest_s", "longest_s", "total_min"]
    print("\n| " + " | ".join(header) + " |\n|---|---|---|---|---|")
    print("\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in rows))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_rows(args.out / "stage_times.csv", header, rows)
        reward = [
            [m["key"][:12], name, value]
            for m in manifests
            if m["stage"] == "reward"
            for name, value in sorted(m.get("metrics", {}).items())
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        ]
        write_rows(args.out / "reward_model.csv", ["reward_model", "metric", "value"], reward)
        if run:
            write_rows(args.out / "run.csv", ["field", "value"], run)


if __name__ == "__main__":
    main()
