"""Wall time of every stage computed into a store, from the manifests (``wall_seconds``), oldest first,
and the total per stage: `python pipelines/stage_times.py [store]` (default ./store). From an empty store
these are one run's stage times, the budget of an experiment."""

import argparse
import json
from collections import defaultdict
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", type=Path, nargs="?", default=Path("store"))
    args = parser.parse_args()
    manifests = sorted(args.store.glob("*/*/manifest.json"), key=lambda p: p.stat().st_mtime)
    totals: dict[str, list[float]] = defaultdict(list)
    print("| stage | key | wall s |\n|---|---|---|")
    for path in manifests:
        manifest = json.loads(path.read_text())
        seconds = manifest.get("wall_seconds")
        if seconds is None:
            continue
        totals[manifest["stage"]].append(seconds)
        print(f"| {manifest['stage']} | {manifest['key']} | {seconds:.0f} |")
    print("\n| stage | runs | total min |\n|---|---|---|")
    for stage, times in totals.items():
        print(f"| {stage} | {len(times)} | {sum(times) / 60:.1f} |")
    print(f"| all | {sum(map(len, totals.values()))} | {sum(map(sum, totals.values())) / 60:.1f} |")


if __name__ == "__main__":
    main()
