"""How the fast engine replays a block for its rows: the clean call, re-indexed (see :mod:`fast_engine`).

A *unit* is a group of ``g`` rows of one IG problem (its quadrature nodes) that share a sequence, a target
position and a layer. A causal unit runs through a block as a ``g``-token "sequence" ``[units, g, d]``: each of
its tokens is the target token under another scaling, attends to the clean keys/values before the target
(shared by the unit, taken once per unit instead of once per row) and to its own key only (a diagonal block in
the mask). Everything comes from the tensors transformers itself built for the clean pass (masks with their
sliding windows and padding, position ids and embeddings, ALiBi), read at each unit's position: nothing is
rebuilt from config names. Shapes that do not fit raise :class:`~knlight.lm.upstream.UpstreamError`.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from knlight.lm.upstream import upstream_error
from knlight.neurons.head_grad import gold_log_prob_grad, head_input, output_linear
from knlight.neurons.ig import gold_log_probs, objective_value


def map_tensors(obj: Any, fn: Any) -> Any:
    """Apply ``fn`` to every tensor inside ``obj`` (tensors, tuples, lists, dicts)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj


def has_axis(value: Any, size: int) -> bool:
    """True when a tensor (or a tensor inside a tuple/list/dict) has an axis of ``size`` after the first."""
    if isinstance(value, torch.Tensor):
        return size in value.shape[1:]
    if isinstance(value, tuple | list):
        return any(has_axis(v, size) for v in value)
    if isinstance(value, dict):
        return any(has_axis(v, size) for v in value.values())
    return False


class BlockCall:
    """The arguments one block received in the clean pass, normalised to keyword form."""

    def __init__(self, block: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        bound = inspect.signature(block.forward).bind(*args, **kwargs)
        named = dict(bound.arguments)
        params = inspect.signature(block.forward).parameters
        for name, param in params.items():
            if param.kind is inspect.Parameter.VAR_KEYWORD and name in named:
                named.update(named.pop(name))
            elif param.kind is inspect.Parameter.VAR_POSITIONAL and name in named and named.pop(name):
                raise TypeError(f"{type(block).__name__} got extra positional arguments; cannot replay it")
        first = next(iter(params))
        self.hidden: torch.Tensor = named.pop(first)
        self.kwargs = named


class Rows:
    """Re-indexes a block's clean call for causal units ``(sequence, target position)`` of ``group`` rows each.

    The keys a unit sees are the clean keys ``0 .. seq_len-1`` (``seq_len`` = the largest target position of
    the units; each unit masks the keys at and after its own position), then the ``group`` keys of its own
    rows, of which each row sees only its own.
    """

    def __init__(
        self,
        block: nn.Module,
        row_seq: torch.Tensor,
        row_pos: torch.Tensor,
        batch: int,
        width: int,
        group: int = 1,
    ) -> None:
        self.block, self.batch, self.width, self.group = block, batch, width, group
        self.row_seq, self.row_pos = row_seq, row_pos
        self.seq_len = int(row_pos.max())

    def _index(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq = self.row_seq if x.shape[0] == self.batch else torch.zeros_like(self.row_seq)
        return seq.to(x.device), self.row_pos.to(x.device)

    def at_target(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x[sequence, position]`` per unit, for a ``[batch or 1, width, ...]`` tensor."""
        if x.dim() < 2 or x.shape[1] != self.width or x.shape[0] not in (1, self.batch):
            raise upstream_error(
                self.block, f"argument {name!r} has shape {tuple(x.shape)}, not [batch, seq, ...]"
            )
        seq, pos = self._index(x)
        return x[seq, pos]

    def per_row(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x[sequence, position]`` for each of a unit's rows: ``[units, group, ...]`` (a broadcast view)."""
        at = self.at_target(name, x)
        return at[:, None].expand(at.shape[0], self.group, *at.shape[1:])

    def _before(self, device: Any) -> torch.Tensor:
        """``[units, seq_len]`` True for the clean keys a unit may see: positions before its own."""
        keys = torch.arange(self.seq_len, device=device)
        return keys[None, :] < self.row_pos.to(device)[:, None]

    def _own(self, own: torch.Tensor, allowed: Any) -> torch.Tensor:
        """``[units, heads, group, group]``: each row sees its own key only, with the clean mask's own entry."""
        eye = torch.eye(self.group, dtype=torch.bool, device=own.device)
        return torch.where(eye, own[..., None, None], allowed)

    def mask(self, mask: Any, dtype: torch.dtype) -> torch.Tensor:
        """The units' attention mask ``[units, heads or 1, group, seq_len + group]`` (``[units, seq_len + 1]``
        for a 2-D padding mask): the unit's row of the clean mask cut before its position, then its own rows."""
        g = self.group
        if mask is None:  # transformers built no mask (no padding, no window): plain causal, additive
            before = self._before(self.row_pos.device)
            clean = before[:, None, None, :].expand(-1, 1, g, -1)
            own = self._own(torch.ones(len(self.row_pos), 1, dtype=torch.bool), False)
            allowed = torch.cat([clean, own], dim=-1)
            additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            return additive.to(self.block_device())
        if not isinstance(mask, torch.Tensor):
            raise upstream_error(self.block, f"attention mask of type {type(mask).__name__} is not a tensor")
        seq, pos = self._index(mask)
        before = self._before(mask.device)
        if mask.dim() == 4 and mask.shape[-2:] == (self.width, self.width):
            rows = mask[seq, :, pos, :]  # [units, heads or 1, width]
            own_entry = rows[torch.arange(len(pos), device=mask.device), :, pos]  # [units, heads or 1]
            clean = rows[..., : self.seq_len]
            blocked: bool | float
            if mask.dtype == torch.bool:
                clean, blocked = clean & before[:, None, :], False
            else:
                blocked = torch.finfo(mask.dtype).min
                clean = clean.masked_fill(~before[:, None, :], blocked)
            clean = clean[:, :, None, :].expand(-1, -1, g, -1)
            return torch.cat([clean, self._own(own_entry, blocked)], dim=-1)
        if mask.dim() == 2 and mask.shape[1] == self.width and g == 1:  # a padding mask (flash attention)
            clean = mask[seq, : self.seq_len] * before.to(mask.dtype)
            return torch.cat([clean, torch.ones_like(clean[:, :1])], dim=1)
        raise upstream_error(self.block, f"attention mask of shape {tuple(mask.shape)} is not understood")

    def alibi(self, alibi: torch.Tensor) -> torch.Tensor:
        """BLOOM's ALiBi ``[batch·heads, 1, width]`` for the units: the clean keys, then the rows' own keys (all
        at the unit's position)."""
        if alibi.dim() != 3 or alibi.shape[-1] != self.width or alibi.shape[0] % self.batch:
            raise upstream_error(self.block, f"ALiBi tensor of shape {tuple(alibi.shape)} is not understood")
        heads = alibi.shape[0] // self.batch
        per_unit = alibi.view(self.batch, heads, self.width)[self.row_seq.to(alibi.device)]
        pos = self.row_pos.to(alibi.device)
        own = per_unit[torch.arange(len(pos), device=alibi.device), :, pos][..., None]
        out = torch.cat([per_unit[..., : self.seq_len], own.expand(-1, -1, self.group)], dim=-1)
        return out.reshape(len(pos) * heads, 1, self.seq_len + self.group)

    def block_device(self) -> torch.device:
        return next(self.block.parameters()).device


def head_value_grad(
    lm: Any, final: torch.Tensor, tokens: torch.Tensor, objective: str, head_rows: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """F, log P(gold) and dF/d(final hidden) of every row, the LM head run in sub-chunks of ``head_rows``.

    With a plain linear output embedding the head's gradient is written out in vocabulary blocks
    (:mod:`knlight.neurons.head_grad`: no ``[rows, vocab]`` logits); else autograd through ``lm.head``.
    """
    x = final.detach()
    values = torch.empty(len(x), dtype=torch.float32, device=x.device)
    log_probs = torch.empty_like(values)
    grads = torch.empty_like(x)
    linear = output_linear(lm)
    for start in range(0, len(x), head_rows):
        part = slice(start, start + head_rows)
        xs = x[part].detach().requires_grad_(True)
        with torch.enable_grad():
            if linear is None:
                log_p = gold_log_probs(lm.head(xs, final_norm=True), tokens[part])
                value = objective_value(log_p, objective)
                (grads[part],) = torch.autograd.grad(value.sum(), xs)
            else:
                z = head_input(lm, xs, linear)
                bias = None if linear.bias is None else linear.bias.detach()
                log_p, dlog_p = gold_log_prob_grad(
                    z.detach(), linear.weight.detach(), bias, tokens[part], lm.sites.logit_softcap
                )
                value = objective_value(log_p, objective)
                dz = (dlog_p * value[:, None] if objective == "prob" else dlog_p).to(z.dtype)
                (grads[part],) = torch.autograd.grad(z, xs, dz) if z is not xs else (dz,)
        values[part] = value.detach()
        log_probs[part] = log_p.detach()
    return values, log_probs, grads
