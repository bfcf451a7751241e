"""What a neuron is and the one range check every neuron set goes through.

A neuron is ``(layer, index)``: row ``index`` of the layer's FFN activation (``docs/design.md``, "Neuron").
"""

from __future__ import annotations

from collections.abc import Iterable

from knlight.errors import KnlightError

Neuron = tuple[int, int]
"""``(layer, index)`` of one FFN neuron."""


class NeuronRangeError(KnlightError, ValueError):
    """A neuron outside the model it is used on (e.g. a neuron file selected on another model)."""


def check_neurons(
    neurons: Iterable[Neuron],
    num_layers: int,
    d_ff: int,
    source: str = "neuron set",
    error: type[Exception] = NeuronRangeError,
) -> None:
    """Raise ``error`` naming the first neuron outside a model of ``num_layers`` layers × ``d_ff`` neurons.

    Args:
        neurons: The neurons to check.
        num_layers: Number of transformer layers of the model.
        d_ff: FFN width of the model.
        source: Where the neurons came from (a file path or a description), named in the message.
        error: The exception class to raise (callers with their own error type, such as edits, pass it).
    """
    for layer, index in neurons:
        if not (0 <= int(layer) < num_layers and 0 <= int(index) < d_ff):
            raise error(
                f"{source}: neuron (layer={layer}, index={index}) is outside this model ({num_layers} "
                f"layers × {d_ff} neurons); was it selected on another model?"
            )
