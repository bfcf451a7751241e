"""The selection step: from attribution scores to knowledge neurons (a neuron file). Pure, no Lightning.

:func:`run_selection` (``knlight select``) reads a predict run's output folder; :func:`select_fact` selects
one fact's neurons from its items (the same code, for in-memory use such as the planted benchmark);
:func:`summarize` prints a run's top and language-independent neurons (``knlight summary``).
"""

from knlight.selection.facts import select_fact
from knlight.selection.options import DknOptions, KnOptions, LiknOptions, UncertaintyOptions
from knlight.selection.reader import (
    AttributionRun,
    DenseScores,
    QueryAttribution,
    SelectionError,
    read_attributions,
)
from knlight.selection.run import run_selection

__all__ = [
    "AttributionRun",
    "DenseScores",
    "DknOptions",
    "KnOptions",
    "LiknOptions",
    "QueryAttribution",
    "SelectionError",
    "UncertaintyOptions",
    "read_attributions",
    "run_selection",
    "select_fact",
]
