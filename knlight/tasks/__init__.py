"""Thin LightningModules over the pure-torch neuron code: one per task (attribution, ...)."""

from knlight.tasks.attribution import AttributionModule
from knlight.tasks.base import BaseTask

__all__ = ["AttributionModule", "BaseTask"]
