"""Lightning callbacks: the attribution prediction writer and TensorBoard figures."""

from knlight.callbacks.intervention_figures import InterventionFigures
from knlight.callbacks.tensorboard import AttributionTensorBoard
from knlight.callbacks.writer import AttributionWriter

__all__ = ["AttributionTensorBoard", "AttributionWriter", "InterventionFigures"]
