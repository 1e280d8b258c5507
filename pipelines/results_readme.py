"""Render the generated blocks of a results README (claims tables, CSV tables) from the files they
name: `python pipelines/results_readme.py [README ...]`, by default results/README.md and the top-level
README.md (`make headlines` and `make length` run it after their runs).

A block reads ``<!-- claims: headlines/claims.json -->`` (or ``<!-- table: <file>.csv -->``), the table,
``<!-- end claims -->`` (``<!-- end table -->``); the table is replaced, the prose around it is left as
written (src/directalign/readme_blocks.py). A block's path is relative to its README's folder:
``headlines/claims.json`` in results/README.md, ``results/headlines/claims.json`` in README.md.
"""

import sys
from pathlib import Path

from directalign.claims import CLAIMS_BLOCK
from directalign.readme_blocks import render_blocks

READMES = (Path("results/README.md"), Path("README.md"))


def main(readme: Path) -> None:
    """Render one README's blocks in place; it must hold at least one claims block."""
    text = readme.read_text()
    if not CLAIMS_BLOCK.search(text):
        sys.exit(f"{readme}: no claims block (<!-- claims: <path> --> ... <!-- end claims -->)")
    readme.write_text(render_blocks(text, readme.parent))
    print(readme)


if __name__ == "__main__":
    for path in [Path(arg) for arg in sys.argv[1:]] or READMES:
        main(path)
