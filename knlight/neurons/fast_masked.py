"""Masked LMs in the fast engine: a row's first and last block computed only where they differ from clean.

A masked row of layer ``l`` scales ``h_l`` at its target position only. In block ``l`` the attention and every
other position are the clean model's, so the block runs once per *sequence* (batch 1, its clean input and call
arguments) and only the FFN output at the row's target differs: ``y_t = y_clean_t + (a_row − a_clean_t) ·
W_outᵀ``; the rest of the block (residual add, post-norm) broadcasts the sequence's clean tensors to its rows.
In the last block only the target position reaches the head, and the FFN is position-wise, so its input is
sliced to the target position; the block's residual add broadcasts the result (the other positions' outputs
are not read). A block that does not broadcast like this (it raises, or returns another shape) is replayed in
full, as before; the sweep's α = 1 replay check guards the values either way. Pure torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from knlight.lm.hooks import edit_activations
from knlight.lm.sites import neuron_columns


def masked_block(
    engine: Any,
    j: int,
    hidden: torch.Tensor | None,
    new: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    args: Any,
) -> torch.Tensor:
    """Block ``j`` of a masked sweep: the running rows (``hidden``) and the rows that start here (``new``).

    Args:
        engine: The :class:`~knlight.neurons.fast_engine.FastEngine` (its clean calls and the model).
        j: The block.
        hidden: ``[n, S, d]`` the rows that started below ``j`` (None: none).
        new: ``(seq, pos, leaf)`` of the rows starting at ``j``: their sequences, target positions and
            ``[k, d_ff]`` activations at the target (leaves of the gradient); None: none.
        args: The chunk's call arguments (``for_layer(j, rows)``: the first ``rows`` rows of the chunk;
            ``for_sequence(j, s)``: one sequence's clean call; ``unit_pos``: every row's target position).

    Returns:
        ``[n + k, S, d]`` block ``j``'s output for the running rows, then the new ones.
    """
    sites = engine.lm.sites
    block, call = sites.blocks[j], engine._calls[j]
    running = 0 if hidden is None else hidden.shape[0]
    fresh = None
    if new is not None and engine.own_block_shortcut:
        fresh = _own_block(engine, j, new, args)
        engine.own_block_shortcut = fresh is not None
    if new is not None and fresh is None:  # the full replay: the new rows run the whole block too
        seq, pos, leaf = new
        rows = call.hidden[seq]
        hidden = rows if hidden is None else torch.cat([hidden, rows])
        at = (torch.arange(running, hidden.shape[0], device=rows.device), pos.to(rows.device))
        with edit_activations(sites.out_projs[j], lambda h: h.index_put(at, leaf.to(h.dtype))):
            return _first(block(hidden, **args.for_layer(j, hidden.shape[0])))
    if hidden is None:
        assert fresh is not None
        return fresh
    last = j == sites.num_layers - 1
    with target_only_ffn(sites.in_projs[j], args.unit_pos[:running]) if last else nullcontext():
        out = _first(block(hidden, **args.for_layer(j, running)))
    if out.shape[1] != hidden.shape[1]:  # [n, 1, d]: the block did not broadcast back to the sequence
        out = out.expand(-1, hidden.shape[1], -1)
    return out if fresh is None else torch.cat([out, fresh])


def _own_block(
    engine: Any, j: int, new: tuple[torch.Tensor, torch.Tensor, torch.Tensor], args: Any
) -> torch.Tensor | None:
    """The new rows' block ``j`` from one clean call per sequence; None when the block does not broadcast."""
    seq, pos, leaf = new
    sites = engine.lm.sites
    block, call, out_proj = sites.blocks[j], engine._calls[j], sites.out_projs[j]
    cols = neuron_columns(out_proj, sites.spec.conv1d)  # [d_model, d_ff]
    width = call.hidden.shape[1]
    pieces: list[torch.Tensor] = []
    order: list[torch.Tensor] = []
    for s in torch.unique(seq).tolist():
        members = (seq == s).nonzero().flatten()
        row_pos = pos[members].to(leaf.device)
        rows = torch.arange(len(members), device=leaf.device)

        def write(
            mod: nn.Module,
            args: tuple[torch.Tensor, ...],
            out: torch.Tensor,
            members: torch.Tensor = members,
            rows: torch.Tensor = rows,
            row_pos: torch.Tensor = row_pos,
        ) -> Any:
            clean_a = args[0][0, row_pos]  # [k, d_ff] the clean activations at the rows' targets
            delta = (leaf[members].to(clean_a.dtype) - clean_a) @ cols.T.to(clean_a.dtype)
            y = out.expand(len(members), -1, -1)
            return y.index_put((rows, row_pos), out[0, row_pos] + delta)

        handle = out_proj.register_forward_hook(write)
        try:
            out = _first(block(call.hidden[s : s + 1], **args.for_sequence(j, s)))
        except RuntimeError:
            return None
        finally:
            handle.remove()
        if out.shape[:2] != (len(members), width):
            return None
        pieces.append(out)
        order.append(members)
    # Back to the rows' order (sequence groups were taken one at a time).
    inverse = torch.argsort(torch.cat(order).to(leaf.device))
    return torch.cat(pieces)[inverse]


@contextmanager
def target_only_ffn(in_projs: Sequence[nn.Module], unit_pos: torch.Tensor) -> Iterator[None]:
    """While active, the FFN input projections see only each row's target position (``[n, 1, d]``)."""

    def pre_hook(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...] | None:
        x = args[0]
        if x.dim() != 3 or x.shape[0] != len(unit_pos):
            return None
        at = unit_pos.to(x.device)
        return (x[torch.arange(len(at), device=x.device), at][:, None], *args[1:])

    with ExitStack() as stack:
        for module in in_projs:
            handle = module.register_forward_pre_hook(pre_hook)
            stack.callback(handle.remove)
        yield


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out
