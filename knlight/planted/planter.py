"""Train-to-plant: write chosen FFN neurons of a small random model so it answers synthetic facts with them.

Recipe (see DESIGN.md, "Ground truth: planted knowledge"):

* a small random-init model (``initializer_range`` 0.1, so logits can reach P ≈ 0.9) of a supported
  architecture, and a word-level tokenizer in which every synthetic word is one token
  (:mod:`knlight.planted.facts`);
* every parameter is frozen except the chosen neurons' slices: their W_in rows (+ bias; gate and up rows
  for gated MLPs) and their W_out columns. The slices are trained as a :class:`~knlight.neurons.edits.NeuronEdit`
  (deltas beside the frozen weights, merged into them at the end: :mod:`knlight.planted.training`);
* W_in starts from a logistic probe that separates the neuron's *on* states (the FFN input at the target
  position of its own queries) from every other state, scaled so that the neuron fires there; carrier
  W_out columns start along the object's output embedding;
* loss = hinge on the answer's log-probability at the target position (P(object) ≥ ``target_prob``, no
  further push, so carriers of one fact share the work instead of each saturating it)
  + ``off_weight`` · [|h| + h² + relu(z + ``pre_off``)] of every planted neuron at every position except
  the target position of its own queries (both signs: the optimiser must not hide the fact in negative
  tails or at other positions; z is the pre-activation, the gate for gated MLPs)
  + ``fire_weight`` · [relu(``fire_margin`` − h) + relu(``pre_on`` − z) + relu(h − ``fire_cap``)] at its own
  target positions (the hinge on z keeps a neuron from dying where the activation function is flat; the cap
  keeps activations bounded)
  + ``necessity_weight`` · relu(log P(object | one carrier dropped) − log P(object) + ``necessity_drop``) on
  the standard facts' queries, one random carrier dropped at the target position: every carrier of a
  standard fact is *necessary* (suppressing it alone costs at least ``necessity_drop`` nats);
* degenerate pairs: at each step each query of the fact drops one member (or neither) at random, so that
  each member alone suffices;
* distractors fire on their fact's queries (trained by the activation terms only: their output is
  detached from the answer loss) but write a fixed W_out column orthogonal to every object's output
  embedding, with the norm of an ordinary neuron of the random model.

Kinds of planted neurons: ``language_independent`` (fires on its fact in every language),
``language_specific`` (one language), ``degenerate`` (a pair, fires in every language, either member alone
carries the fact) and ``distractor``. A fact carries either independent + specific neurons ("standard"
facts) or one degenerate pair (and nothing else), plus its distractors.

Modules: :mod:`~knlight.planted.config` (the configuration and the kinds), :mod:`~knlight.planted.build` (facts,
model, neuron choice, batch), :mod:`~knlight.planted.initialisation`, :mod:`~knlight.planted.training`,
:mod:`~knlight.planted.verify`, :mod:`~knlight.planted.model` (the result and its folder). This module holds
:func:`plant`, which runs them in order.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from knlight.planted.build import Planter, assign_neurons, build_model
from knlight.planted.config import (
    CARRIER_KINDS,
    KINDS,
    STANDARD_KINDS,
    TOKENIZER_FOR,
    PlantConfig,
    PlantedNeuron,
    config_to_dict,
)
from knlight.planted.initialisation import initialise
from knlight.planted.model import PlantedModel
from knlight.planted.training import train
from knlight.planted.verify import activation_report, answer_probs, verify_plant

log = logging.getLogger(__name__)

# What this module held before the split, still importable from here.
__all__ = [
    "CARRIER_KINDS",
    "KINDS",
    "STANDARD_KINDS",
    "TOKENIZER_FOR",
    "PlantConfig",
    "PlantedModel",
    "PlantedNeuron",
    "assign_neurons",
    "build_model",
    "config_to_dict",
    "plant",
    "verify_plant",
]


def plant(model_type: str = "gpt2", seed: int = 0, **overrides: Any) -> PlantedModel:
    """Build a small random model of ``model_type`` and plant synthetic multilingual facts in chosen neurons.

    Args:
        model_type: ``gpt2``, ``llama``, ``qwen2`` or ``bert``.
        seed: Seed of the facts, model, neuron choice and training.
        overrides: Any :class:`PlantConfig` field.

    Returns:
        The planted model, its records, its ground truth and a verification report (``report``).
    """
    if model_type not in TOKENIZER_FOR:
        raise ValueError(f"the planter supports model types {sorted(TOKENIZER_FOR)}, not {model_type!r}")
    config = PlantConfig(model_type=model_type, seed=seed, **overrides)
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    planter = Planter(config)
    p_before = answer_probs(planter.lm, planter.batch.encoded, [[]])[:, 0]
    initialise(planter)
    terms = train(planter)
    planted = PlantedModel(planter.lm, planter.records, planter.neurons, config)
    report = verify_plant(planted, p_before)
    report.update(activation_report(planter))
    report["final_loss"] = terms
    report["seconds"] = round(time.perf_counter() - start, 2)
    planted.report = report
    log.info(
        "planted %s seed %d: P(object) %.3f (before %.4f), suppressed %.4f, %d neurons, %.1fs",
        model_type,
        seed,
        report["p_clean"],
        report["p_before"],
        report["p_suppressed"],
        len(planter.neurons),
        report["seconds"],
    )
    return planted
