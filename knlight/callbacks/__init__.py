"""Lightning callbacks: the attribution prediction writer, selection at the end of predict, TensorBoard figures."""

from knlight.callbacks.intervention_figures import InterventionFigures
from knlight.callbacks.select import SelectNeurons
from knlight.callbacks.tensorboard import AttributionTensorBoard
from knlight.callbacks.writer import AttributionWriter

__all__ = ["AttributionTensorBoard", "AttributionWriter", "InterventionFigures", "SelectNeurons"]
