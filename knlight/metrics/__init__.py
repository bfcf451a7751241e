"""torchmetrics for knlight's evaluation loops: intervention success rates (more to come: editing, "
"fact-checking)."""

from knlight.metrics.intervention import (
    InterventionRows,
    Vocabulary,
    jaccard_table,
    layer_distribution,
    summarise,
)

__all__ = ["InterventionRows", "Vocabulary", "jaccard_table", "layer_distribution", "summarise"]
