"""Thin LightningModules over the pure-torch neuron code: one per task."""

from knlight.tasks.attribution import AttributionModule
from knlight.tasks.base import BaseTask
from knlight.tasks.editing import EditingDataModule, EditingModule
from knlight.tasks.factcheck import FactCheckDataModule, FactCheckModule
from knlight.tasks.intervention import InterventionModule, NeuronSource

__all__ = [
    "AttributionModule",
    "BaseTask",
    "EditingDataModule",
    "EditingModule",
    "FactCheckDataModule",
    "FactCheckModule",
    "InterventionModule",
    "NeuronSource",
]
