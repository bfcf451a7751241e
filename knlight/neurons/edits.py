"""Neuron-restricted weight edits: trainable deltas for chosen FFN neurons beside frozen base weights.

A neuron ``(layer, index)`` owns three weight slices (see DESIGN.md, "The neuron"): its row of every FFN
input projection (``c_fc``; ``intermediate.dense``; ``gate_proj`` *and* ``up_proj``; ``dense_h_to_4h``), the
matching bias entry where a bias exists, and its column of the FFN output projection. A :class:`NeuronEdit`
holds one delta per slice as ``nn.Parameter`` and adds it **in the forward pass** through forward hooks:

* input projection ``j``: ``out[..., idx] += x @ ΔW_in[j]ᵀ + Δb[j]`` (identical to ``W_in[idx] += ΔW_in``);
* output projection: ``out += h[..., idx] @ ΔW_out`` (identical to ``W_out[:, idx] += ΔW_outᵀ``).

The base tensors are never written, so :meth:`NeuronEdit.remove` restores the model bitwise, an optimizer
given :meth:`NeuronEdit.parameters` can only move the deltas, and an edit is a small file
(:meth:`NeuronEdit.save`) that records the model it was made on (:meth:`NeuronEdit.base_identity`: a sketch
of the base weights at the edited neurons, checked by :meth:`NeuronEdit.load`). :meth:`NeuronEdit.merge` bakes
an edit into the weights (keeping exact copies of the touched slices, so :meth:`NeuronEdit.unmerge` restores
them bitwise too).

Layouts: ``nn.Linear`` weights are ``[out, in]``; GPT-2 ``Conv1D`` weights are ``[in, out]``
(:func:`knlight.lm.sites.neuron_rows` / :func:`~knlight.lm.sites.neuron_columns` know which; callers never
do). Deltas are stored layout-free: ``in_weight[j, k]`` is neuron k's input row (length ``d_model``) of input
projection j and ``out_weight[k]`` its output column (length ``d_model``).

Training-free edits are NeuronEdits too: :func:`direct_edit` (Dai et al.:
``W_out[:, n] += λ2·E(new) − λ1·E(old)``) and :func:`scale_edit` (``W_out[:, n] ·= factor``: 0 suppresses a
neuron at every position, 2 enhances it).

This module is the public face of the edits; the code lives in :mod:`knlight.neurons.edit_layout` (sizes,
neuron ranges, errors), :mod:`knlight.neurons.neuron_edit` (the deltas, hooks and merging),
:mod:`knlight.neurons.edit_files` (the file format and the base-weights check) and
:mod:`knlight.neurons.direct_edits` (training-free edits). Pure torch, no Lightning.
"""

from knlight.neurons.direct_edits import direct_edit, output_columns, scale_edit, token_embeddings
from knlight.neurons.edit_files import FORMAT, SKETCH_SIZE, NeuronEditFiles
from knlight.neurons.edit_layout import EditLayout, Neuron, NeuronEditError, check_neurons, model_layout
from knlight.neurons.neuron_edit import NeuronEdit

__all__ = [
    "FORMAT",
    "SKETCH_SIZE",
    "EditLayout",
    "Neuron",
    "NeuronEdit",
    "NeuronEditError",
    "NeuronEditFiles",
    "check_neurons",
    "direct_edit",
    "model_layout",
    "output_columns",
    "scale_edit",
    "token_embeddings",
]
