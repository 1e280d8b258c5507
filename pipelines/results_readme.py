"""Render the claims tables of a results README from the claims.json files they name:
`python pipelines/results_readme.py [results/README.md]` (`make headlines` runs it after the run).

A block reads ``<!-- claims: headlines/claims.json -->``, the table, ``<!-- end claims -->``; the
table is replaced, the prose around it is left as written.
"""

import sys
from pathlib import Path

from directalign.claims import CLAIMS_BLOCK, render_claim_blocks


def main(readme: Path) -> None:
    text = readme.read_text()
    if not CLAIMS_BLOCK.search(text):
        sys.exit(f"{readme}: no claims block (<!-- claims: <path> --> ... <!-- end claims -->)")
    readme.write_text(render_claim_blocks(text, readme.parent))
    print(readme)


if __name__ == "__main__":
    if len(sys.argv) > 2:
        sys.exit(__doc__.splitlines()[0])
    main(Path(sys.argv[1] if len(sys.argv) == 2 else "results/README.md"))
