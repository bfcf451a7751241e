"""Capture and overwrite neuron activations (the input of each block's FFN output projection)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

ActivationEdit = Callable[[torch.Tensor], torch.Tensor]


@contextmanager
def edit_activations(out_proj: nn.Module, edit: ActivationEdit) -> Iterator[None]:
    """Replace ``h`` (the out-projection's input, ``[batch, seq, d_ff]``) by ``edit(h)`` while active."""

    def pre_hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (edit(args[0]), *args[1:])

    handle = out_proj.register_forward_pre_hook(pre_hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def capture_activations(out_projs: list[nn.Module], store: dict[int, torch.Tensor]) -> Iterator[None]:
    """Record ``h_l`` of every listed layer into ``store[layer]`` (detached) while active."""

    def make_hook(layer: int) -> ActivationEdit:
        def capture(h: torch.Tensor) -> torch.Tensor:
            store[layer] = h.detach()
            return h

        return capture

    with ExitStack() as stack:
        for layer, module in enumerate(out_projs):
            stack.enter_context(edit_activations(module, make_hook(layer)))
        yield


def scale_neurons(
    h: torch.Tensor,
    positions: torch.Tensor,
    neuron_index: torch.Tensor,
    factor: torch.Tensor | float,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return ``h`` with ``h[row, position, neuron] *= factor`` for the given (row, position, neuron) triples.

    Args:
        h: Activations ``[batch, seq, d_ff]``.
        positions: Target position per triple.
        neuron_index: Neuron index per triple.
        factor: Multiplier (0 suppresses, 2 enhances), scalar or per triple.
        rows: Batch row per triple (default: ``arange``).
    """
    rows = torch.arange(len(positions), device=h.device) if rows is None else rows
    h = h.clone()
    h[rows, positions, neuron_index] = h[rows, positions, neuron_index] * factor
    return h
