"""Export an off-policy dataset as a preference dataset in TRL's format:
`python pipelines/export_offpolicy.py <store or store/generate/<key>> <out>`.

`<out>` ending in .parquet or .jsonl gets one file; any other name a folder that
`datasets.load_from_disk(<out>)` reads. The columns are described in `src/directalign/export.py`.
"""

import argparse
import logging
from pathlib import Path

from directalign.errors import UserError
from directalign.export import export_offpolicy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("offpolicy", type=Path, help="a store holding one off-policy dataset, or its folder")
    parser.add_argument("out", type=Path, help="a .parquet or .jsonl file, or a folder (save_to_disk)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        pairs = export_offpolicy(args.offpolicy)
    except UserError as error:
        raise SystemExit(f"directalign: {error}") from None
    if args.out.suffix == ".parquet":
        pairs.to_parquet(args.out)
    elif args.out.suffix == ".jsonl":
        pairs.to_json(args.out, lines=True)
    else:
        pairs.save_to_disk(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
