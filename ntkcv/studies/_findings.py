"""What a study found: the paper's claims with verdicts, tables of numbers, and their markdown."""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from ntkcv.studies._stats import Estimate

Verdict = Literal["reproduced", "partly reproduced", "not reproduced", "inconclusive"]


@dataclasses.dataclass(frozen=True)
class Claim:
    """A claim of a paper, whether this sweep reproduces it, and the evidence in one plain sentence."""

    paper: str
    verdict: Verdict
    evidence: str


@dataclasses.dataclass(frozen=True)
class Table:
    """A caption, column names and rows of formatted cells."""

    caption: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]

    def markdown(self) -> str:
        lines = [f"**{self.caption}**", "", "| " + " | ".join(self.header) + " |",
                 "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Findings:
    """A study's result: ``claims`` with verdicts, ``tables``, ``notes`` (caveats, counts of failed runs) and
    ``values``, the numbers behind the tables keyed for programs and tests (documented per study)."""

    study: str
    title: str
    claims: tuple[Claim, ...]
    tables: tuple[Table, ...]
    notes: tuple[str, ...] = ()
    values: dict[str, Any] = dataclasses.field(default_factory=dict)

    def markdown(self, figures: Sequence[pathlib.Path] = (), *, relative_to: pathlib.Path | None = None) -> str:
        """The findings as a markdown section; ``figures`` are linked relative to ``relative_to``."""
        lines = [f"## {self.title}", ""]
        for claim in self.claims:
            lines.append(f"- **{claim.verdict.capitalize()}.** {claim.paper} — {claim.evidence}")
        lines.append("")
        for table in self.tables:
            lines += [table.markdown(), ""]
        if self.notes:
            lines += [f"- {note}" for note in self.notes] + [""]
        for figure in figures:
            link = figure.relative_to(relative_to) if relative_to is not None else figure
            lines += [f"![{figure.stem}]({link.as_posix()})", ""]
        return "\n".join(lines)


def verdict(supporting: int, total: int) -> Verdict:
    """All of ``total`` cases support the claim: reproduced; some: partly; none: not; no cases: inconclusive."""
    if total == 0:
        return "inconclusive"
    if supporting == total:
        return "reproduced"
    return "partly reproduced" if supporting else "not reproduced"


def fmt(value: float, spec: str = ".3f") -> str:
    """``value`` formatted with ``spec``; ``n/a`` for NaN."""
    return "n/a" if math.isnan(value) else format(value, spec)


def sign_claim(paper: str, estimates: Sequence[tuple[str, Estimate]], *, expected: int, quantity: str,
               groups: str = "sizes") -> Claim:
    """The claim that ``quantity`` has sign ``expected`` (+1 or -1) in every group, judged by where each group's
    interval lies: reproduced in all groups, partly in some; groups with the opposite sign are named, groups
    without an interval (too few values) are not judged."""
    sides = {1: "positive", -1: "negative"}
    judged = [(label, estimate) for label, estimate in estimates if not math.isnan(estimate.low)]
    hits = sum(estimate.sign == expected for _, estimate in judged)
    opposite = [label for label, estimate in judged if estimate.sign == -expected]
    against = f"; significantly {sides[-expected]} at {', '.join(opposite)}" if opposite else ""
    unjudged = len(estimates) - len(judged)
    skipped = f"; {unjudged} {groups} too small for an interval" if unjudged else ""
    detail = "; ".join(f"{label}: {quantity} = {estimate}" for label, estimate in estimates)
    return Claim(paper, verdict(hits, len(judged)), f"{quantity} is significantly {sides[expected]} in {hits} of "
                 f"{len(judged)} {groups}{against}{skipped} ({detail}).")
