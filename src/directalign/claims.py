"""Claims as data: each claim of a paper that a run tests, the paired difference that tests it and its
verdict, written to ``claims.json`` and rendered as a table, so that what a README says was checked is
exactly what the run measured.

A claim says that ``contrast`` (e.g. "copg - dpo") moves ``metric`` (a summary.csv metric such as
gold_reward) in ``direction`` (+1 up, -1 down, 0: a difference either way, the direction found reported
by the mean's sign). It is read under a ``protocol``: at matched KL or matched length (``at`` the point,
both policies read off their reward-KL curves, ``frontier.py``), at each method's picked beta
(``at_pick``), or at the betas a run configured (``at_beta``). Its paired difference gives a mean and
a standard error ``se`` over prompts (and training seeds), and from them a two-sided ``p`` under the
normal approximation. Every claims file is one family: ``p_holm`` is Holm's step-down adjustment over
its rows (sort p ascending, ``p_holm_(i) = max_{j <= i} min(1, (m - j + 1) p_(j))``), which controls the
chance of any false verdict in the file with no assumption about how the rows depend on each other.

Verdict rule, on ``p_holm`` at level 0.05: **supported** when ``p_holm < 0.05`` and the mean's sign is the
claimed direction (any sign for a two-sided claim); **contradicted** when ``p_holm < 0.05`` and the sign
is the opposite; **inconclusive** otherwise, and whenever ``mean == 0``.
"""

import json
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from scipy.stats import binomtest, norm  # scipy comes with scikit-learn, a dependency

from directalign.errors import ConfigError, DataError
from directalign.estimates import PairedDifference

SUPPORTED, CONTRADICTED, INCONCLUSIVE = "supported", "contradicted", "inconclusive"
# The family-wise error level of a claims file.
ALPHA = 0.05
# matched_kl / matched_length: read off two curves where both reach ``at``; at_pick: each method at the
# beta its selection picked; at_beta: each method at the beta a run configured.
PROTOCOLS = ("matched_kl", "matched_length", "at_pick", "at_beta")
DIRECTIONS = (1, -1, 0)


@dataclass(frozen=True)
class Estimate:
    """A claim's paired estimate, before its family's correction: ``seeds`` training seeds behind each
    policy (the fewest of either side), ``n`` paired prompts (0: the claim could not be read)."""

    claim: str
    paper: str
    contrast: str
    metric: str
    direction: int
    protocol: str
    at: float | None
    seeds: int
    mean: float
    se: float
    n: int

    def __post_init__(self) -> None:
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"claim {self.claim!r}: direction={self.direction!r} must be +1, -1 or 0")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"claim {self.claim!r}: protocol {self.protocol!r} is not one of {PROTOCOLS}")


@dataclass(frozen=True)
class Claim(Estimate):
    """One tested claim; its fields, in this order, are the keys of a claims.json record."""

    p: float
    p_holm: float
    verdict: str


CLAIM_KEYS = tuple(f.name for f in fields(Claim))


def two_sided_p(mean: float, se: float, n: int) -> float:
    """The normal two-sided p of ``mean`` given its standard error; 1 for a claim not read (``n == 0``)
    or a zero difference."""
    if n == 0 or mean == 0:
        return 1.0
    return 0.0 if se == 0 else float(2 * norm.sf(abs(mean) / se))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    adjusted, running = [0.0] * len(p_values), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


def verdict(mean: float, p_holm: float, direction: int) -> str:
    """The module's rule: decided only when the family-adjusted p is under ``ALPHA``."""
    if mean == 0 or not p_holm < ALPHA:
        return INCONCLUSIVE
    return SUPPORTED if direction == 0 or math.copysign(1, mean) == direction else CONTRADICTED


def family(estimates: Sequence[Estimate]) -> list[Claim]:
    """The claims of one file: each estimate with its p, Holm's adjustment over all of them and its
    verdict."""
    p_values = [two_sided_p(e.mean, e.se, e.n) for e in estimates]
    return [
        Claim(
            **{f.name: getattr(e, f.name) for f in fields(Estimate)},
            p=p,
            p_holm=p_holm,
            verdict=verdict(e.mean, p_holm, e.direction),
        )
        for e, p, p_holm in zip(estimates, p_values, holm(p_values), strict=True)
    ]


def build_claim(
    claim: str,
    paper: str,
    contrast: str,
    metric: str,
    direction: int,
    difference: PairedDifference,
    protocol: str = "at_beta",
    seeds: int = 1,
) -> Estimate:
    """A claim tested by the paired ``difference`` of ``metric`` (first policy of ``contrast`` minus the
    second, on the same prompts, its standard error over prompts and training seeds)."""
    values = np.asarray(difference.differences, dtype=np.float64)
    n_not_finite = int((~np.isfinite(values)).sum())
    if values.size < 2 or n_not_finite or not math.isfinite(difference.se):
        raise DataError(
            f"claim {claim!r}: {values.size} paired differences of {metric}, {n_not_finite} not finite; "
            "needs at least 2, all finite"
        )
    return Estimate(
        claim,
        paper,
        contrast,
        metric,
        int(direction),
        protocol,
        None,
        seeds,
        float(difference.mean),
        float(difference.se),
        int(values.size),
    )


def write_claims(claims: Sequence[Claim], path: Path) -> None:
    """``claims.json``: a JSON list of claim records, keys in ``CLAIM_KEYS`` order so diffs stay small."""
    path.write_text(json.dumps([asdict(c) for c in claims], indent=2) + "\n")


def read_claims(path: Path) -> list[Claim]:
    """The claims of a claims.json; refuses a record with other keys, or a p, Holm p or verdict that the
    rule does not give from its mean and standard error."""
    records = json.loads(path.read_text())
    for row, record in enumerate(records):
        if list(record) != list(CLAIM_KEYS):
            raise DataError(
                f"{path} row {row}: keys {list(record)} are not the claim keys {list(CLAIM_KEYS)}"
            )
    stated = [Claim(**record) for record in records]
    for row, (claim, expected) in enumerate(zip(stated, family(stated), strict=True)):
        for key in ("p", "p_holm", "verdict"):
            stated_value, rule_value = getattr(claim, key), getattr(expected, key)
            if stated_value != rule_value:
                raise DataError(f"{path} row {row}: {key} {stated_value!r}, the rule gives {rule_value!r}")
    return stated


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def claims_table(claims: Sequence[Claim]) -> str:
    """A markdown table of the claims for a results README, one row per claim."""
    header = ["claim", "paper", "protocol", "contrast", "metric", "claimed", "mean ± se", "seeds", "n"]
    header += ["p", "p (Holm)", "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for c in claims:
        cells = [
            _cell(c.claim),
            _cell(c.paper),
            c.protocol.replace("_", " ") + ("" if c.at is None else f" {c.at:.3g}"),
            _cell(c.contrast),
            _cell(c.metric),
            {1: "> 0", -1: "< 0", 0: "≠ 0"}[c.direction],
            f"{c.mean:+.4g} ± {c.se:.2g}",
            str(c.seeds),
            str(c.n),
            f"{c.p:.2g}",
            f"{c.p_holm:.2g}",
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
