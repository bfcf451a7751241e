"""What an edit depends on in a model: its sizes (:class:`EditLayout`), its neurons' ranges and its errors.

Pure torch, no Lightning. See :mod:`knlight.neurons.edits` for the edit itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from knlight.errors import KnlightError
from knlight.lm import LanguageModel
from knlight.lm.sites import NeuronSites, neuron_columns, resolve_sites
from knlight.neurons.neuron import Neuron
from knlight.neurons.neuron import check_neurons as check_range


class NeuronEditError(KnlightError, ValueError):
    """An edit that does not fit a model (neuron out of range, other sizes or weights, unsupported layout), or
    an edit file that cannot be read."""


@dataclass(frozen=True)
class EditLayout:
    """The sizes an edit depends on; an edit only applies to a model with the same layout.

    Attributes:
        model_type: ``config.model_type``.
        num_layers: Transformer blocks.
        d_ff: FFN width (neurons per layer).
        d_model: Hidden size (length of a neuron's input row and output column).
        n_in: Input projections per layer (2 for gated MLPs: gate and up).
        in_bias: The input projections have a bias.
    """

    model_type: str
    num_layers: int
    d_ff: int
    d_model: int
    n_in: int
    in_bias: bool


def model_and_sites(model: nn.Module | LanguageModel) -> tuple[nn.Module, NeuronSites]:
    """The Hugging Face model and its neuron sites, from either a model or a :class:`~knlight.LanguageModel`."""
    if isinstance(model, LanguageModel):
        return model.model, model.sites
    return model, resolve_sites(model)


def model_layout(model: nn.Module | LanguageModel) -> EditLayout:
    """Read the :class:`EditLayout` of a Hugging Face LM-head model (or a :class:`~knlight.LanguageModel`).

    Raises:
        NeuronEditError: For a layout the hooks cannot serve (Bloom's tensor-parallel ``slow_but_exact`` path,
            input projections of mixed bias).
    """
    net, sites = model_and_sites(model)
    config = getattr(net, "config", None)
    if getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False):
        raise NeuronEditError(
            "Bloom with pretraining_tp > 1 and slow_but_exact=True calls F.linear on weight slices, "
            "bypassing the FFN output projection's forward; set config.slow_but_exact = False."
        )
    in_projs = sites.in_projs[0]
    biases = {getattr(p, "bias", None) is not None for p in in_projs}
    if len(biases) != 1:
        raise NeuronEditError(f"input projections {in_projs} mix biased and bias-free layers; not supported")
    return EditLayout(
        model_type=str(getattr(config, "model_type", type(net).__name__)),
        num_layers=sites.num_layers,
        d_ff=sites.d_ff,
        d_model=int(neuron_columns(sites.out_projs[0], sites.spec.conv1d).shape[0]),
        n_in=len(in_projs),
        in_bias=biases.pop(),
    )


def check_neurons(neurons: Iterable[Neuron], num_layers: int, d_ff: int, source: str = "neuron set") -> None:
    """Raise :class:`NeuronEditError` naming the first neuron outside a model of the given size."""
    check_range(neurons, num_layers, d_ff, source=source, error=NeuronEditError)
