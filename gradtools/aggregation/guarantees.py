"""What each aggregator guarantees, and to what precision: the one table the docs and the tests read.

:data:`PROPERTIES` names each property and says what it means; :data:`GUARANTEES`
lists, for every registry name (``gradtools.aggregation.available()``), the
properties that the aggregator built with its default arguments holds;
:data:`HOLDS_TO` says to what precision each property holds, as a function of
the epsilon of the gradients' dtype. ``tests/test_guarantees.py`` asserts every
entry end to end through :class:`gradtools.MultiTask`, on float32 and float64
gradients that include linearly dependent rows, zero rows, tensors with fewer
elements than tasks and per-task scales from 1e-10 to 1e15; a property that is
not listed is not claimed, even where it may hold.

Why the precision is the gradients' and not float64's: :class:`gradtools.MultiTask`
multiplies the Gram blocks in float64, so they are exact for the gradients as
stored, and the solvers work in float64 too. What is left is the rounding of the
combined gradient, written in the gradients' dtype, and the decisions a rounding
error in the gradients could flip (rank, the existence of an equal-angle
direction, Pareto stationarity), which every aggregator takes at the gradients'
epsilon (the ``precision`` argument of :meth:`gradtools.aggregation.Aggregator.aggregate`). The
active-set QPs (MGDA, UPGrad, DualProj, CAGrad's inner problem) take no such
decision: they are solved exactly for the Gram they are given, so a caller who
passes a Gram computed in float32 gets their guarantees relative to that
rounded Gram, not to the exact gradients.
"""

from __future__ import annotations

import torch

__all__ = ["GUARANTEES", "HOLDS_TO", "PROPERTIES", "markdown_table", "solver_floor", "tolerance"]

PROPERTIES: dict[str, str] = {
    "weighted": "the shared parameters' .grad is sum_t w_t g_t with the weights the step's stats report",
    "finite": "finite weights and .grad on any finite input (zero, dependent or opposite rows, any scales)",
    "non_conflicting": "<d, g_i> >= 0 for every task i: no task's loss increases to first order",
    "permutation_invariant": "reordering the losses leaves .grad unchanged",
    "linear_under_scaling": "c -> d(diag(c) J) is linear on c > 0 (multiplying loss i by c_i scales its share)",
    "scale_invariant_weights": "multiplying every loss by one factor leaves the weights unchanged",
    "convex_weights": "the weights are >= 0 and sum to 1",
    "equal_angle": "on linearly independent gradients every g_i / |g_i| has the same projection on d",
    "zero_at_stationary": (
        "at a strongly Pareto-stationary point (v'J = 0 for some v > 0) the update is 0"
    ),
    "zero_at_stationary_c_ge_1": "as zero_at_stationary when built with c >= 1 (CAGrad)",
}

_ALL = frozenset({"weighted", "finite"})

GUARANTEES: dict[str, frozenset[str]] = {
    "sum": _ALL | {"permutation_invariant", "linear_under_scaling", "scale_invariant_weights"},
    "mean": _ALL | {"permutation_invariant", "linear_under_scaling", "scale_invariant_weights"},
    "random": _ALL | {"linear_under_scaling", "scale_invariant_weights", "convex_weights"},
    "pcgrad": _ALL | {"linear_under_scaling", "scale_invariant_weights"},
    "mgda": _ALL
    | {
        "non_conflicting",
        "permutation_invariant",
        "scale_invariant_weights",
        "convex_weights",
        "zero_at_stationary",
    },
    "cagrad": _ALL
    | {"permutation_invariant", "scale_invariant_weights", "zero_at_stationary_c_ge_1"},
    "imtlg": _ALL | {"permutation_invariant", "scale_invariant_weights", "equal_angle"},
    "config": _ALL
    | {
        "permutation_invariant",
        "linear_under_scaling",
        "scale_invariant_weights",
        "equal_angle",
    },
    "alignedmtl": _ALL | {"permutation_invariant", "scale_invariant_weights"},
    "upgrad": _ALL
    | {
        "non_conflicting",
        "permutation_invariant",
        "linear_under_scaling",
        "scale_invariant_weights",
        "zero_at_stationary",
    },
    "dualproj": _ALL
    | {
        "non_conflicting",
        "permutation_invariant",
        "scale_invariant_weights",
        "zero_at_stationary",
    },
    "nashmtl": _ALL,
    "fairgrad": _ALL,
    "gradvac": _ALL | {"scale_invariant_weights"},
}

# property -> (multiple of the gradients' epsilon, floor, what the error is relative to).
# The floor is the float64 solvers' own accuracy (the active-set QP's KKT tolerance
# and the eigenvalue cutoffs), which a float64 model reaches before its epsilon.
_HOLDS_TO: dict[str, tuple[float, float, str]] = {
    "weighted": (4.0, 0.0, "sum_t |w_t| |g_tk|, element k by element"),
    "finite": (0.0, 0.0, "exact: no inf or NaN"),
    "non_conflicting": (
        8.0,
        1e-10,
        "|g_i| S (S = max_t |g_t| + sum_t |w_t| |g_t|) for the eps part, max_t |g_t|^2 for "
        "the floor (MGDA's KKT tolerance is relative to the largest squared norm)",
    ),
    "permutation_invariant": (64.0, 1e-8, "S"),
    "linear_under_scaling": (64.0, 1e-8, "the three updates' S summed"),
    "scale_invariant_weights": (0.0, 1e-9, "max_t |w_t| (power-of-two factors: exact gradients)"),
    "convex_weights": (0.0, 1e-9, "1"),
    "equal_angle": (64.0, 1e-9, "S"),
    "zero_at_stationary": (256.0, 1e-8, "max_t |g_t| max_t v_t / min_t v_t"),
    "zero_at_stationary_c_ge_1": (256.0, 1e-8, "max_t |g_t| max_t v_t / min_t v_t"),
}


def _holds_to(factor: float, floor: float, what: str) -> str:
    terms = [f"{factor:g} T eps"] if factor else []
    terms += [f"{floor:g}"] if floor else []
    return f"{' + '.join(terms)}, relative to {what}" if terms else what


HOLDS_TO: dict[str, str] = {name: _holds_to(*parts) for name, parts in _HOLDS_TO.items()}


def tolerance(name: str, dtype: torch.dtype, num_tasks: int = 1) -> float:
    """Relative tolerance to which property ``name`` holds for gradients of ``dtype``.

    ``factor * T * eps(dtype) + floor`` (see :data:`HOLDS_TO`); T enters because
    the combined gradient is a sum of T rounded terms.
    """
    factor, floor, _ = _HOLDS_TO[name]
    return factor * num_tasks * float(torch.finfo(dtype).eps) + floor


def solver_floor(name: str) -> float:
    """The part of :func:`tolerance` that is the float64 solvers' accuracy, not the rounding."""
    return _HOLDS_TO[name][1]


def markdown_table() -> str:
    """The guarantees as Markdown: one row per aggregator, then what each property means."""
    names = list(PROPERTIES)

    def cell(text: str) -> str:
        return text.replace("|", "\\|")  # a bare | would end the cell

    lines = [
        "| aggregator | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for aggregator, held in sorted(GUARANTEES.items()):
        cells = ["yes" if n in held else "" for n in names]
        lines.append(f"| `{aggregator}` | " + " | ".join(cells) + " |")
    lines += [
        "",
        "| property | meaning | holds to (eps: the epsilon of the gradients' dtype) |",
        "|---|---|---|",
    ]
    lines += [f"| `{n}` | {cell(PROPERTIES[n])} | {cell(HOLDS_TO[n])} |" for n in names]
    return "\n".join(lines) + "\n"
