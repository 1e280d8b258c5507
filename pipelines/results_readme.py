"""Render the generated blocks of a results README (claims tables, CSV tables) from the files they
name: `python pipelines/results_readme.py [results/README.md]` (`make headlines` runs it after the run).

A block reads ``<!-- claims: headlines/claims.json -->`` (or ``<!-- table: <file>.csv -->``), the table,
``<!-- end claims -->`` (``<!-- end table -->``); the table is replaced, the prose around it is left as
written (src/directalign/readme_blocks.py).
"""

import sys
from pathlib import Path

from directalign.claims import CLAIMS_BLOCK
from directalign.readme_blocks import render_blocks


def main(readme: Path) -> None:
    text = readme.read_text()
    if not CLAIMS_BLOCK.search(text):
        sys.exit(f"{readme}: no claims block (<!-- claims: <path> --> ... <!-- end claims -->)")
    readme.write_text(render_blocks(text, readme.parent))
    print(readme)


if __name__ == "__main__":
    if len(sys.argv) > 2:
        sys.exit(__doc__.splitlines()[0])
    main(Path(sys.argv[1] if len(sys.argv) == 2 else "results/README.md"))
