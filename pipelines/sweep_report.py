"""Gather the jobs of a multirun into one sweep report:
`python pipelines/sweep_report.py <sweep dir> [--out DIR] [--matched-kl KL ...]`.

Hydra writes the same report when a multirun ends (the SweepReport callback); this reruns it, for
instance after a sweep whose jobs ran on a cluster or were completed by hand, or to copy it into
results/.
"""

import argparse
import logging
import sys
from pathlib import Path

from directalign.sweep import write_sweep_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument(
        "--out", type=Path, default=None, help="report folder (default <sweep dir>/sweep_report)"
    )
    parser.add_argument(
        "--matched-kl", type=float, nargs="*", default=[], help="KLs (nats) to compare methods at"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = write_sweep_report(args.sweep_dir, args.out, args.matched_kl)
    if out is None:
        sys.exit(f"no evaluated job (results/policies.json) under {args.sweep_dir}")
    print(out)


if __name__ == "__main__":
    main()
