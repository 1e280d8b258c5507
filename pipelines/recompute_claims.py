"""Recompute every claims.json of results/ from the files beside it (per_prompt.csv, claims_spec.json):
`python pipelines/recompute_claims.py [--check] [folder ...]` (default: every results/ folder with a
claims spec). `--check` writes nothing and exits 1 if a recomputed claims.json differs from the file.
"""

import argparse
import sys
import tempfile
from pathlib import Path
from shutil import copy

from directalign.frontier_report import CLAIMS_FILE, PER_PROMPT_FILE, SPEC_FILE, recompute_claims


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path)
    parser.add_argument(
        "--check", action="store_true", help="compare with the committed files, write nothing"
    )
    args = parser.parse_args()
    folders = args.folders or sorted(p.parent for p in Path("results").rglob(SPEC_FILE))
    if not folders:
        sys.exit("no folder with a claims_spec.json under results/")
    differ = []
    for folder in folders:
        if args.check:
            with tempfile.TemporaryDirectory() as scratch:
                for name in (PER_PROMPT_FILE, SPEC_FILE):
                    copy(folder / name, Path(scratch) / name)
                recompute_claims(Path(scratch))
                same = (Path(scratch) / CLAIMS_FILE).read_bytes() == (folder / CLAIMS_FILE).read_bytes()
        else:
            recompute_claims(folder)
            same = True
        print(f"{folder / CLAIMS_FILE}: {'same' if same else 'DIFFERS'}")
        if not same:
            differ.append(folder)
    if differ:
        sys.exit(f"recomputed claims differ from the committed ones in {[str(f) for f in differ]}")


if __name__ == "__main__":
    main()
