"""Claims as data: each claim of a paper that a run tests, the paired difference that tests it and its
verdict, written to ``claims.json`` and rendered as a table, so that what a README says was checked is
exactly what the run measured.

Verdict rule. A claim says that ``contrast`` (e.g. "copg - dpo") moves ``metric`` (a summary.csv metric
such as gold_reward) in ``direction`` (+1 up, -1 down). With the paired difference's mean and standard
error ``se`` over the prompts:

- supported: ``|mean| >= 2 se`` and the sign of the mean is the claimed direction;
- contradicted: ``|mean| >= 2 se`` and the sign is the opposite;
- inconclusive: otherwise, and whenever ``mean == 0`` (identical outputs give ``se == 0`` as well).

2 se is a two-sided test at about 5% under the normal approximation of a mean over prompts.
"""

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from scipy.stats import binomtest  # scipy comes with scikit-learn, a dependency

from directalign.estimates import PairedDifference
from directalign.validation import ConfigError, DataError

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"


@dataclass(frozen=True)
class Claim:
    """One tested claim; its fields, in this order, are the keys of a claims.json record."""

    claim: str
    paper: str
    contrast: str
    metric: str
    direction: int
    mean: float
    se: float
    n: int
    verdict: str


CLAIM_KEYS = tuple(f.name for f in fields(Claim))


def verdict(mean: float, se: float, direction: int) -> str:
    """The module's rule: decided only when the mean is at least two standard errors from zero."""
    if mean == 0 or abs(mean) < 2 * se:
        return INCONCLUSIVE
    return SUPPORTED if math.copysign(1, mean) == direction else CONTRADICTED


def build_claim(
    claim: str, paper: str, contrast: str, metric: str, direction: int, difference: PairedDifference
) -> Claim:
    """A claim tested by the paired ``difference`` of ``metric`` (first policy of ``contrast`` minus the
    second, on the same prompts, its standard error over prompts and training seeds)."""
    if direction not in (1, -1):
        raise ConfigError(f"claim {claim!r}: direction={direction!r} must be +1 or -1")
    values = np.asarray(difference.differences, dtype=np.float64)
    n_not_finite = int((~np.isfinite(values)).sum())
    if values.size < 2 or n_not_finite or not math.isfinite(difference.se):
        raise DataError(
            f"claim {claim!r}: {values.size} paired differences of {metric}, {n_not_finite} not finite; "
            "needs at least 2, all finite"
        )
    mean, se = float(difference.mean), float(difference.se)
    return Claim(
        claim, paper, contrast, metric, int(direction), mean, se, values.size, verdict(mean, se, direction)
    )


def write_claims(claims: Sequence[Claim], path: Path) -> None:
    """``claims.json``: a JSON list of claim records, keys in ``CLAIM_KEYS`` order so diffs stay small."""
    path.write_text(json.dumps([asdict(c) for c in claims], indent=2) + "\n")


def read_claims(path: Path) -> list[Claim]:
    """The claims of a claims.json; refuses a record with other keys or a verdict the rule does not give."""
    claims = []
    for row, record in enumerate(json.loads(path.read_text())):
        if sorted(record) != sorted(CLAIM_KEYS):
            raise DataError(
                f"{path} row {row}: keys {sorted(record)} are not the claim keys {list(CLAIM_KEYS)}"
            )
        claim = Claim(**record)
        expected = verdict(claim.mean, claim.se, claim.direction)
        if claim.verdict != expected:
            raise DataError(f"{path} row {row}: verdict {claim.verdict!r}, the rule gives {expected!r}")
        claims.append(claim)
    return claims


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def claims_table(claims: Sequence[Claim]) -> str:
    """A markdown table of the claims for a results README, one row per claim."""
    header = ["claim", "paper", "contrast", "metric", "claimed", "mean ± se", "n", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in claims:
        cells = [
            _cell(c.claim),
            _cell(c.paper),
            _cell(c.contrast),
            _cell(c.metric),
            "> 0" if c.direction == 1 else "< 0",
            f"{c.mean:+.4g} ± {c.se:.2g}",
            str(c.n),
            c.verdict,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# A generated claims table in a results README: the block between these markers is rendered from the
# claims.json it names (relative to the README), so the README says exactly what the run measured.
CLAIMS_BLOCK = re.compile(r"(<!-- claims: (?P<path>\S+) -->\n)(?P<table>.*?)(<!-- end claims -->)", re.DOTALL)


def render_claim_blocks(readme: str, root: Path) -> str:
    """``readme`` with each claims block's table rendered anew from its claims.json under ``root``."""

    def render(match: re.Match) -> str:
        path = root / match["path"]
        if not path.is_file():
            raise DataError(f"claims block names {match['path']}, which is not a file under {root}")
        return match[1] + claims_table(read_claims(path)) + match[4]

    return CLAIMS_BLOCK.sub(render, readme)


@dataclass(frozen=True)
class WinTieLoss:
    """A policy against a baseline on the same prompts.

    ``ties`` are prompts where both wrote the same text; ``equal_scores`` those where the texts differ but
    score exactly the same (a judge with discrete scores); the sign test uses only ``wins`` and ``losses``.
    """

    wins: int
    ties: int
    losses: int
    equal_scores: int
    p_value: float


def sign_test_p_value(wins: int, losses: int) -> float:
    """Two-sided exact sign test of wins against losses (1.0 when there are neither)."""
    changed = wins + losses
    return float(binomtest(wins, changed, 0.5).pvalue) if changed else 1.0


def win_tie_loss(
    policy_texts: Sequence[str],
    baseline_texts: Sequence[str],
    policy_scores: Sequence[float],
    baseline_scores: Sequence[float],
) -> WinTieLoss:
    """Count wins, ties and losses prompt by prompt, with a tie decided by identical texts.

    Never by equal scores: the same text scored in differently composed batches can differ by ~1e-7, which
    float comparison would count as a win or a loss.
    """
    sizes = [len(policy_texts), len(baseline_texts), len(policy_scores), len(baseline_scores)]
    if len(set(sizes)) != 1:
        raise DataError(
            f"win_tie_loss: policy texts, baseline texts, policy scores, baseline scores: {sizes}"
        )
    wins = ties = losses = equal_scores = 0
    for row, (policy_text, baseline_text, policy_score, baseline_score) in enumerate(
        zip(policy_texts, baseline_texts, policy_scores, baseline_scores, strict=True)
    ):
        if not (math.isfinite(policy_score) and math.isfinite(baseline_score)):
            raise DataError(f"win_tie_loss: row {row} scores {policy_score} against {baseline_score}")
        if policy_text == baseline_text:
            ties += 1
        elif policy_score > baseline_score:
            wins += 1
        elif policy_score < baseline_score:
            losses += 1
        else:
            equal_scores += 1
    return WinTieLoss(wins, ties, losses, equal_scores, sign_test_p_value(wins, losses))
