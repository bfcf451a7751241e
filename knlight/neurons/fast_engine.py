"""The fast IG engine: the same numbers as ``reference``, far fewer FLOPs.

Both compute, for a batch of :class:`~knlight.neurons.attribution.Problems`, ``sum_k w_k dF/da`` along
``a = base + α_k·diff`` at one layer and one target position, plus F at α=0 (for the completeness residual).

The fast engine:

* one clean pass under ``no_grad`` caches, per layer, each block's input and call arguments (masks, rotary
  embeddings...) and, for causal LMs, the keys and values of every position;
* parameters are frozen; gradients are taken only w.r.t. the interpolated activations;
* the scaled rows start at the cached input of their layer (nothing below it is recomputed) and rows of all
  layers advance together through the blocks ("staircase": a row joins when the sweep reaches its layer);
* causal LMs: scaling ``h_l`` at the last position changes nothing at earlier positions, so a row is a
  *single-token* pass through layers l..L-1 that attends to the clean keys/values (exact);
* the LM head (and final norm) is applied only at the target rows;
* prompts of a batch share the sweep (padding, per-row target index); ``chunk_rows`` bounds memory.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from knlight.lm.hooks import capture_activations, edit_activations
from knlight.lm.upstream import (
    RecordingCache,
    RowCache,
    base_model_forward,
    is_cache,
    last_hidden_state,
    upstream_error,
)
from knlight.neurons.ig import CleanPass, Problems, gold_log_probs, objective_value


def _map_tensors(obj: Any, fn: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple):
        return tuple(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, list):
        return [_map_tensors(o, fn) for o in obj]
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


class _BlockCall:
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


class FastEngine:
    """Exact IG with cached clean states, single-token causal sweeps and batched rows (see module doc)."""

    def __init__(self, lm: Any, chunk_rows: int | None = None) -> None:
        self.lm = lm
        self.chunk_rows = chunk_rows or (64 if lm.masked else 512)
        self._calls: list[_BlockCall] = []
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._clean_lp: dict[tuple[int, int], float] = {}

    # -- clean pass -----------------------------------------------------------------------------------------

    def _forward_clean(self, seqs: Sequence[Sequence[int]], keep_states: bool) -> tuple[torch.Tensor, dict]:
        lm = self.lm
        sites, device = lm.sites, lm.device
        ids, mask = lm.pad(seqs)
        store: dict[int, torch.Tensor] = {}
        calls: dict[int, _BlockCall] = {}
        # Causal LMs: a cache of knlight's own, found again in every block's call by type, whatever its keyword.
        cache = RecordingCache() if keep_states and not lm.masked else None
        handles = []
        if keep_states:
            for j, block in enumerate(sites.blocks):

                def pre_hook(module: nn.Module, args: tuple, kwargs: dict, j: int = j) -> None:
                    calls[j] = _BlockCall(module, args, kwargs)
                    if cache is not None:
                        cache.current_block = j

                handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
        try:
            with torch.no_grad(), capture_activations(sites.out_projs, store):
                out = base_model_forward(
                    lm.model, cache, input_ids=ids.to(device), attention_mask=mask.to(device)
                )
        finally:
            for handle in handles:
                handle.remove()
        if keep_states:
            self._calls = [calls[j] for j in range(sites.num_layers)]
            if cache is not None:
                missing = [j for j in range(sites.num_layers) if j not in cache.recorded]
                if missing:
                    raise upstream_error(
                        sites.blocks[missing[0]], "its attention never updated the KV cache knlight passed"
                    )
                self._kv = [cache.recorded[j] for j in range(sites.num_layers)]
        return last_hidden_state(out), store

    def clean(
        self, seqs: Sequence[Sequence[int]], targets: Sequence[Sequence[tuple[int, int]]], keep: bool = False
    ) -> CleanPass:
        """Clean activations and gold log-probs; ``keep`` caches the states the sweep starts from."""
        last_hidden, store = self._forward_clean(seqs, keep_states=keep)
        sites = self.lm.sites
        rows = torch.tensor([r for r, tgt in enumerate(targets) for _ in tgt])
        pos = torch.tensor([p for tgt in targets for p, _ in tgt])
        tokens = torch.tensor([t for tgt in targets for _, t in tgt], device=last_hidden.device)
        with torch.no_grad():
            hidden = last_hidden[rows, pos]
            # base_model already applied the final norm; only the head remains.
            log_probs = gold_log_probs(self.lm.head(hidden), tokens).cpu()
        acts_all = torch.stack([store[layer][rows, pos] for layer in range(sites.num_layers)], dim=1).cpu()
        counts = [len(tgt) for tgt in targets]
        if keep:
            self._clean_lp = {
                (int(r), int(p)): float(v) for r, p, v in zip(rows.tolist(), pos.tolist(), log_probs.tolist())
            }
        return CleanPass(list(acts_all.split(counts)), list(log_probs.split(counts)))

    # -- sweep ----------------------------------------------------------------------------------------------

    def integrate(
        self, problems: Problems, alphas: torch.Tensor, weights: torch.Tensor, objective: str, need_f0: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        nodes = torch.cat([alphas, torch.zeros(1, dtype=alphas.dtype)]) if need_f0 else alphas
        node_w = torch.cat([weights, torch.zeros(1, dtype=weights.dtype)]) if need_f0 else weights
        m = len(nodes)
        grad_sum = torch.zeros(len(problems), problems.base.shape[1])
        f0 = torch.full((len(problems),), float("nan"))
        order = torch.argsort(problems.layer, stable=True)
        self._check_sweep(problems)
        per_chunk = max(1, self.chunk_rows // m)
        for start in range(0, len(order), per_chunk):
            chunk = order[start : start + per_chunk]
            g, f = self._sweep(problems, chunk, nodes, node_w, objective)
            grad_sum[chunk] = g
            if need_f0:
                f0[chunk] = f[:, -1]
        return grad_sum, f0

    def _check_sweep(self, problems: Problems) -> None:
        """Guard against a silently wrong sweep: at α = 1 a row *is* the clean model, so its log-probability
        must equal the clean pass's. Checked on the first problem of every layer (a handful of rows).

        Raises:
            UpstreamError: When they differ (e.g. a transformers release changed how blocks are called).
        """
        first = {int(layer): p for p, layer in reversed(list(enumerate(problems.layer.tolist())))}
        chosen = torch.tensor([first[layer] for layer in sorted(first)])  # the sweep wants layer order
        one = torch.ones(1, dtype=torch.float64)
        _, value = self._sweep(problems, chosen, one, torch.zeros(1, dtype=torch.float64), "log_prob")
        half = next(self.lm.model.parameters()).dtype in (torch.float16, torch.bfloat16)
        tolerance = 0.5 if half else 1e-3
        for k, p in enumerate(chosen.tolist()):
            clean = self._clean_lp[(int(problems.seq[p]), int(problems.position[p]))]
            got = float(value[k, 0])
            if not abs(got - clean) <= tolerance:
                layer = int(problems.layer[p])
                raise upstream_error(
                    self.lm.sites.blocks[layer],
                    f"the fast engine's replay of layer {layer} gives log P = {got:.6g} where the model gives "
                    f"{clean:.6g}: the blocks are called differently than knlight expects",
                )

    def _sweep(
        self,
        problems: Problems,
        chunk: torch.Tensor,
        nodes: torch.Tensor,
        node_w: torch.Tensor,
        objective: str,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        lm, sites = self.lm, self.lm.sites
        device, dtype = lm.device, next(lm.model.parameters()).dtype
        m = len(nodes)
        # Rows: problem-major, node-minor; problems are sorted by layer so each layer's rows are contiguous.
        row_seq = problems.seq[chunk].repeat_interleave(m)
        row_pos = problems.position[chunk].repeat_interleave(m)
        row_tok = problems.token[chunk].repeat_interleave(m)
        row_layer = problems.layer[chunk].repeat_interleave(m)
        path = (
            problems.base[chunk].double()[:, None]
            + nodes[None, :, None] * problems.diff[chunk].double()[:, None]
        )
        path = path.reshape(len(row_seq), -1).to(device=device, dtype=dtype)
        causal = not lm.masked
        first = int(row_layer.min())
        bounds = torch.searchsorted(row_layer, torch.arange(sites.num_layers + 1))
        leaves: list[torch.Tensor] = []
        hidden: torch.Tensor | None = None
        for j in range(first, sites.num_layers):
            lo, hi = int(bounds[j]), int(bounds[j + 1])
            call = self._calls[j]
            if hi > lo:
                # Causal rows start as the single target token; masked rows as the whole sequence.
                new = (
                    call.hidden[row_seq[lo:hi], row_pos[lo:hi]][:, None, :]
                    if causal
                    else call.hidden[row_seq[lo:hi]]
                )
                hidden = new if hidden is None else torch.cat([hidden, new])
            assert hidden is not None
            active = hidden.shape[0]
            kwargs = self._kwargs(j, row_seq[:active], row_pos[:active])
            if hi > lo:
                leaf = path[lo:hi].clone().requires_grad_(True)
                leaves.append(leaf)
                rows = torch.arange(lo, hi, device=device)
                at = torch.zeros_like(rows) if causal else row_pos[lo:hi].to(device)

                def put(
                    h: torch.Tensor, rows: torch.Tensor = rows, at: torch.Tensor = at, leaf=leaf
                ) -> torch.Tensor:
                    return h.index_put((rows, at), leaf.to(h.dtype))

                with edit_activations(sites.out_projs[j], put):
                    out = sites.blocks[j](hidden, **kwargs)
            else:
                out = sites.blocks[j](hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        assert hidden is not None
        take = torch.zeros(len(row_seq), dtype=torch.long) if causal else row_pos
        final = hidden[torch.arange(len(row_seq)), take.to(device)]
        value = objective_value(
            gold_log_probs(self.lm.head(final, final_norm=True), row_tok.to(device)), objective
        )
        grads = torch.autograd.grad(value.sum(), leaves)
        grad = torch.cat(grads).float().cpu().reshape(len(chunk), m, -1)
        grad_sum = (node_w.float()[None, :, None] * grad).sum(1)
        return grad_sum, value.detach().float().cpu().reshape(len(chunk), m)

    def _kwargs(self, j: int, row_seq: torch.Tensor, row_pos: torch.Tensor) -> dict[str, Any]:
        """Block ``j``'s clean call arguments, re-indexed for the active rows."""
        call = self._calls[j]
        batch, width = call.hidden.shape[:2]

        def by_row(x: torch.Tensor) -> torch.Tensor:
            return x[row_seq.to(x.device)] if x.dim() > 0 and x.shape[0] == batch else x

        if self.lm.masked:
            return {k: _map_tensors(v, by_row) for k, v in call.kwargs.items()}
        # Causal single-token rows: row r is position t_r attending to the clean keys/values before it.
        block = self.lm.sites.blocks[j]
        rows = _Rows(block, row_seq, row_pos, batch, width)
        kwargs: dict[str, Any] = {}
        for name, value in call.kwargs.items():
            if is_cache(value):
                keys, values = self._kv[j]
                rs = row_seq.to(keys.device)
                kwargs[name] = RowCache(keys[rs, :, : rows.seq_len], values[rs, :, : rows.seq_len])
            elif name == "attention_mask":
                kwargs[name] = rows.mask(value, call.hidden.dtype)
            elif name == "position_ids":
                kwargs[name] = None if value is None else rows.at_target(name, value)[:, None]
            elif name == "position_embeddings":
                kwargs[name] = _map_tensors(
                    value, lambda x: rows.at_target("position_embeddings", x)[:, None]
                )
            elif name == "cache_position":  # transformers < 5.24: the new token's index in the cache
                kwargs[name] = None if value is None else torch.tensor([rows.seq_len], device=value.device)
            elif name == "alibi":
                kwargs[name] = rows.alibi(value)
            elif _has_axis(value, width):
                raise upstream_error(
                    block,
                    f"argument {name!r} has a sequence axis knlight cannot re-index for single-token rows",
                )
            else:
                kwargs[name] = _map_tensors(value, by_row)
        if not any(is_cache(v) for v in call.kwargs.values()):
            raise upstream_error(
                block, "no transformers Cache among its arguments; cannot sweep single tokens"
            )
        return kwargs


def _has_axis(value: Any, size: int) -> bool:
    """True when a tensor (or a tensor inside a tuple/list/dict) has an axis of ``size`` after the first."""
    if isinstance(value, torch.Tensor):
        return size in value.shape[1:]
    if isinstance(value, tuple | list):
        return any(_has_axis(v, size) for v in value)
    if isinstance(value, dict):
        return any(_has_axis(v, size) for v in value.values())
    return False


class _Rows:
    """Re-indexes a block's clean call for single-token rows ``(sequence, target position)``.

    Everything comes from the tensors transformers itself built for the clean pass (masks with their sliding
    windows and padding, position ids and embeddings, ALiBi), read at each row's position: nothing is rebuilt
    from config names. Shapes that do not fit raise :class:`~knlight.lm.upstream.UpstreamError`.
    """

    def __init__(
        self, block: nn.Module, row_seq: torch.Tensor, row_pos: torch.Tensor, batch: int, width: int
    ) -> None:
        self.block, self.batch, self.width = block, batch, width
        self.row_seq, self.row_pos = row_seq, row_pos
        self.seq_len = int(row_pos.max())

    def _index(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        seq = self.row_seq if x.shape[0] == self.batch else torch.zeros_like(self.row_seq)
        return seq.to(x.device), self.row_pos.to(x.device)

    def at_target(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """``x[sequence, position]`` per row, for a ``[batch or 1, width, ...]`` tensor."""
        if x.dim() < 2 or x.shape[1] != self.width or x.shape[0] not in (1, self.batch):
            raise upstream_error(
                self.block, f"argument {name!r} has shape {tuple(x.shape)}, not [batch, seq, ...]"
            )
        seq, pos = self._index(x)
        return x[seq, pos]

    def _before(self, device: Any) -> torch.Tensor:
        """``[R, seq_len]`` True for the clean keys a row may see: positions before its own."""
        keys = torch.arange(self.seq_len, device=device)
        return keys[None, :] < self.row_pos.to(device)[:, None]

    def mask(self, mask: Any, dtype: torch.dtype) -> torch.Tensor:
        """The row's attention mask: its row of the clean mask, cut before its position, then itself."""
        if mask is None:  # transformers built no mask (no padding, no window): plain causal, additive
            allowed = torch.cat(
                [self._before(self.row_pos.device), torch.ones(len(self.row_pos), 1, dtype=torch.bool)], dim=1
            )
            additive = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
            return additive[:, None, None, :].to(self.block_device())
        if not isinstance(mask, torch.Tensor):
            raise upstream_error(self.block, f"attention mask of type {type(mask).__name__} is not a tensor")
        seq, pos = self._index(mask)
        before = self._before(mask.device)
        if mask.dim() == 4 and mask.shape[-2:] == (self.width, self.width):
            rows = mask[seq, :, pos, :]  # [R, heads or 1, width]
            own = rows[torch.arange(len(pos), device=mask.device), :, pos][..., None]  # [R, heads or 1, 1]
            clean = rows[..., : self.seq_len]
            if mask.dtype == torch.bool:
                clean = clean & before[:, None, :]
            else:
                clean = clean.masked_fill(~before[:, None, :], torch.finfo(mask.dtype).min)
            return torch.cat([clean, own], dim=-1)[:, :, None, :]
        if mask.dim() == 2 and mask.shape[1] == self.width:  # a padding mask (flash attention)
            clean = mask[seq, : self.seq_len] * before.to(mask.dtype)
            return torch.cat([clean, torch.ones_like(clean[:, :1])], dim=1)
        raise upstream_error(self.block, f"attention mask of shape {tuple(mask.shape)} is not understood")

    def alibi(self, alibi: torch.Tensor) -> torch.Tensor:
        """BLOOM's ALiBi ``[batch·heads, 1, width]`` for the rows: the clean keys, then the row's own position."""
        if alibi.dim() != 3 or alibi.shape[-1] != self.width or alibi.shape[0] % self.batch:
            raise upstream_error(self.block, f"ALiBi tensor of shape {tuple(alibi.shape)} is not understood")
        heads = alibi.shape[0] // self.batch
        per_row = alibi.view(self.batch, heads, self.width)[
            self.row_seq.to(alibi.device)
        ]  # [R, heads, width]
        pos = self.row_pos.to(alibi.device)
        own = per_row[torch.arange(len(pos), device=alibi.device), :, pos][..., None]
        out = torch.cat([per_row[..., : self.seq_len], own], dim=-1)
        return out.reshape(len(pos) * heads, 1, self.seq_len + 1)

    def block_device(self) -> torch.device:
        return next(self.block.parameters()).device
