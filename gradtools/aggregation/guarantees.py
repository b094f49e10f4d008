"""Which guarantee each aggregator gives: one table for the tests and the docs.

STAND-IN written by the docs branch (h5-docs) so that the site renders the table
from this module; the branch that owns the aggregators provides the real module
with the same API (``PROPERTIES``, ``GUARANTEES``, :func:`markdown_table`), which
replaces this file at merge. The rows here transcribe the README's table.
"""

from __future__ import annotations

__all__ = ["GUARANTEES", "PROPERTIES", "markdown_table"]

#: Each property's meaning, in the columns' order.
PROPERTIES: dict[str, str] = {
    "weighted": "the result is a combination of the task gradients",
    "non-conflicting": "<d, g_i> >= 0 for every task i",
    "linear under scaling": "scaling task i's gradient by c_i > 0 makes the result linear in c",
}

#: The properties each aggregator (by class name) guarantees for any input.
GUARANTEES: dict[str, frozenset[str]] = {
    "Sum": frozenset({"weighted", "linear under scaling"}),
    "Mean": frozenset({"weighted", "linear under scaling"}),
    "Random": frozenset({"weighted", "linear under scaling"}),
    "PCGrad": frozenset({"weighted", "linear under scaling"}),
    "GradVac": frozenset({"weighted"}),
    "MGDA": frozenset({"weighted", "non-conflicting"}),
    "CAGrad": frozenset({"weighted"}),
    "IMTLG": frozenset({"weighted"}),
    "ConFIG": frozenset(),
    "AlignedMTL": frozenset({"weighted"}),
    "UPGrad": frozenset({"weighted", "non-conflicting", "linear under scaling"}),
    "DualProj": frozenset({"weighted", "non-conflicting"}),
    "NashMTL": frozenset(),
    "FairGrad": frozenset(),
}


def markdown_table() -> str:
    """The guarantees as a Markdown table: one row per aggregator, one column per property."""
    header = "| aggregator | " + " | ".join(PROPERTIES) + " |"
    rule = "|---|" + "---|" * len(PROPERTIES)
    rows = [f"| `{name}` | " + " | ".join("yes" if p in held else "" for p in PROPERTIES) + " |"
            for name, held in GUARANTEES.items()]
    return "\n".join([header, rule, *rows])
