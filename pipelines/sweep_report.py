"""Gather the jobs of a multirun into one sweep report: `python pipelines/sweep_report.py <sweep dir>`.

Hydra writes the same report when a multirun ends (the SweepReport callback); this reruns it, for
instance after a sweep whose jobs ran on a cluster or were completed by hand.
"""

import logging
import sys
from pathlib import Path

from directalign.sweep import write_sweep_report


def main(sweep_dir: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = write_sweep_report(Path(sweep_dir))
    if out is None:
        sys.exit(f"no evaluated job (results/summary.csv) under {sweep_dir}")
    print(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__.splitlines()[0])
    main(sys.argv[1])
