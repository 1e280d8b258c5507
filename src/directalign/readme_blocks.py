"""Generated blocks of a results README: each is rendered anew from the committed file it names, so the
README says exactly what the files hold (`pipelines/results_readme.py`; a test fails on drift).

- ``<!-- claims: headlines/claims.json -->`` ... ``<!-- end claims -->``: the claims table.
- ``<!-- table: headlines/stage_times.csv -->`` ... ``<!-- end table -->``: a CSV file as a markdown
  table, numbers to 4 significant digits.
"""

import csv
import re
from pathlib import Path

from directalign.claims import render_claim_blocks
from directalign.errors import DataError
from directalign.report import format_cell

TABLE_BLOCK = re.compile(r"(<!-- table: (?P<path>\S+) -->\n)(?P<table>.*?)(<!-- end table -->)", re.DOTALL)


def _value(text: str) -> str:
    try:
        number = float(text)
    except ValueError:
        return text.replace("|", "\\|")
    return text if number.is_integer() and "." not in text else format_cell(number)


def csv_table(path: Path) -> str:
    """A CSV file as a markdown table."""
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows:
        raise DataError(f"{path} is empty: a table block needs a header row")
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(_value(cell) for cell in row) + " |" for row in rows[1:]]
    return "\n".join(lines) + "\n"


def render_blocks(readme: str, root: Path) -> str:
    """``readme`` with every claims and table block rendered anew from its file under ``root``."""

    def render(match: re.Match) -> str:
        path = root / match["path"]
        if not path.is_file():
            raise DataError(f"table block names {match['path']}, which is not a file under {root}")
        return match[1] + csv_table(path) + match[4]

    return TABLE_BLOCK.sub(render, render_claim_blocks(readme, root))
