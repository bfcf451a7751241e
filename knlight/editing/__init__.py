"""Neuron-restricted knowledge editing, the pure-torch part (no Lightning).

* :mod:`~knlight.editing.rules`: which neurons of a fact an edit touches (neuron rules over a neuron file);
* :mod:`~knlight.editing.requests`: the facts to edit, into what (explicit, derived, injected);
* :mod:`~knlight.editing.plan`: training, evaluation and KL rows, and the schedule of global batches;
* :mod:`~knlight.editing.scoring`: target and competitor log-probabilities of rows;
* :mod:`~knlight.editing.training`: trainable slices, the optimizer, the loss, the rows a group keeps;
* :mod:`~knlight.editing.baselines`: the training-free methods compared with the edit;
* :mod:`~knlight.editing.measures`: what an evaluation row measures under a method;
* :mod:`~knlight.editing.options`: the option blocks of an editing run.

The Lightning side, :class:`knlight.tasks.editing.EditingModule`, holds the hooks and the wiring.
"""

from knlight.editing.measures import RowScore, metric_names, row_measures
from knlight.editing.plan import EditPlan, plan_edits, plan_enhancement, plan_facts, schedule
from knlight.editing.requests import EditRequest, build_requests, derived_specs, read_edit_requests
from knlight.editing.rules import NeuronRule, parse_rule, read_fact_neurons, rule_neurons
from knlight.editing.scoring import Scorer

__all__ = [
    "EditPlan",
    "EditRequest",
    "NeuronRule",
    "RowScore",
    "Scorer",
    "build_requests",
    "derived_specs",
    "metric_names",
    "parse_rule",
    "plan_edits",
    "plan_enhancement",
    "plan_facts",
    "read_edit_requests",
    "read_fact_neurons",
    "row_measures",
    "rule_neurons",
    "schedule",
]
