"""The fast IG engine: the same numbers as ``reference``, far fewer FLOPs, run as large matmuls.

Both compute, for a batch of :class:`~knlight.neurons.ig.Problems`, ``sum_k w_k dF/da`` along
``a = base + α_k·diff`` at one layer and one target position, plus F at α=0 (for the completeness residual).

The fast engine:

* one clean pass under ``no_grad`` caches, per layer, each block's input and call arguments (masks, rotary
  embeddings...) and, for causal LMs, the keys and values of every position;
* parameters are frozen; gradients are taken only w.r.t. the interpolated activations;
* the scaled rows start at the cached input of their layer (nothing below it is recomputed) and rows of all
  layers advance together through the blocks ("staircase": a row joins when the sweep reaches its layer);
* causal LMs: scaling ``h_l`` at the last position changes nothing at earlier positions, so a row is a
  *single-token* pass through layers l..L-1 that attends to the clean keys/values (exact). The m rows of one
  problem go through a block as one m-token unit ``[units, m, d]`` that shares one copy of the clean
  keys/values and sees its own keys through a diagonal mask (:mod:`knlight.neurons.fast_rows`), so attention
  is a batched matmul and nothing is copied per row;
* masked LMs: a row's own block runs once per sequence (only the target's FFN output differs per row) and its
  last block only at the target position (:mod:`knlight.neurons.fast_masked`);
* masks, positions and the other call arguments are re-indexed once per chunk and sliced per layer;
* the LM head (and final norm) is applied only at the target rows, in sub-chunks of ``head_rows`` rows whose
  gradient is taken at once; with a plain linear output embedding its gradient is written out over vocabulary
  blocks (an online softmax, :mod:`knlight.neurons.head_grad`), so the ``[rows, vocab]`` logits never exist;
* prompts of a batch share the sweep (padding, per-row target index); ``chunk_rows`` bounds memory
  (:mod:`knlight.neurons.memory` plans it from a budget).
"""

from __future__ import annotations

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
from knlight.neurons.fast_masked import masked_block
from knlight.neurons.fast_rows import BlockCall, Rows, has_axis, head_value_grad, map_tensors
from knlight.neurons.ig import CleanPass, Problems, gold_log_probs
from knlight.neurons.memory import ModelShape, budget_bytes, default_head_rows, fixed_chunks, plan_sweep

_Rows = Rows  # the name tests patch to simulate a replay that ignores the model's mask
DEFAULT_CHUNK_ROWS = {True: 64, False: 512}
"""Rows per chunk when neither ``chunk_rows`` nor a budget is given (masked, causal)."""


class FastEngine:
    """Exact IG with cached clean states, single-token causal sweeps and batched rows (see module doc).

    Args:
        lm: A :class:`knlight.LanguageModel`.
        chunk_rows: Rows (problems × quadrature nodes) per sweep; None for the default; ``"auto"``: planned
            from ``max_memory_gb`` (:mod:`knlight.neurons.memory`).
        head_rows: Rows per LM-head sub-chunk; None: as many as keep the logits within ~256 MB (or the plan's).
        max_memory_gb: The budget of ``chunk_rows="auto"`` in GiB; None: 90 % of what the device has free.
    """

    def __init__(
        self,
        lm: Any,
        chunk_rows: int | str | None = None,
        head_rows: int | None = None,
        max_memory_gb: float | None = None,
    ) -> None:
        self.lm = lm
        self.shape = ModelShape.of(lm)
        # The budget is read before the clean pass allocates anything (it is charged to the budget).
        self.budget = budget_bytes(max_memory_gb, lm.device) if chunk_rows == "auto" else None
        self.chunk_rows = chunk_rows if isinstance(chunk_rows, int) else DEFAULT_CHUNK_ROWS[bool(lm.masked)]
        self.head_rows = head_rows or default_head_rows(self.shape)
        self.fixed_head_rows = head_rows is not None
        self.planned_bytes: int | None = None
        """The largest planned peak of the last ``integrate`` (``chunk_rows="auto"`` only)."""
        self._calls: list[BlockCall] = []
        self._kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._clean_lp: dict[tuple[int, int], float] = {}
        self.own_block_shortcut = True
        """Masked LMs: a row's own block from one clean call per sequence (off once a block does not broadcast)."""

    # -- clean pass -----------------------------------------------------------------------------------------

    def _forward_clean(self, seqs: Sequence[Sequence[int]], keep_states: bool) -> tuple[torch.Tensor, dict]:
        lm = self.lm
        sites, device = lm.sites, lm.device
        ids, mask = lm.pad(seqs)
        store: dict[int, torch.Tensor] = {}
        calls: dict[int, BlockCall] = {}
        # Causal LMs: a cache of knlight's own, found again in every block's call by type, whatever its keyword.
        cache = RecordingCache() if keep_states and not lm.masked else None
        handles = []
        if keep_states:
            for j, block in enumerate(sites.blocks):

                def pre_hook(module: nn.Module, args: tuple, kwargs: dict, j: int = j) -> None:
                    calls[j] = BlockCall(module, args, kwargs)
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
            self._clean_lp = dict(zip(zip(rows.tolist(), pos.tolist()), log_probs.tolist()))
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
        # The α = 1 node (when the quadrature has one) checks every problem at no extra cost; else a small sweep.
        at_one = (nodes == 1).nonzero().flatten().tolist()
        if not at_one:
            self._check_sweep(problems)
        for lo, hi in self._chunks(problems.layer[order].tolist(), m):
            chunk = order[lo:hi]
            g, f, log_p = self._sweep(problems, chunk, nodes, node_w, objective)
            if at_one:
                self._check_clean(problems, chunk, log_p[:, at_one[0]])
            grad_sum[chunk] = g
            if need_f0:
                f0[chunk] = f[:, -1]
        return grad_sum, f0

    def _chunks(self, sorted_layers: list[int], m: int) -> list[tuple[int, int]]:
        """Problem ranges (in layer order): fixed ``chunk_rows``, or planned from the budget."""
        if self.budget is None:
            return fixed_chunks(len(sorted_layers), m, self.chunk_rows)
        batch, seq_len = self._calls[0].hidden.shape[:2]
        grouped = not self.lm.masked and self._grouped()
        plan = plan_sweep(self.shape, sorted_layers, m, seq_len, batch, self.budget, grouped)
        if not self.fixed_head_rows:
            self.head_rows = plan.head_rows
        self.planned_bytes = plan.planned_bytes
        return plan.chunks

    def _check_sweep(self, problems: Problems) -> None:
        """Guard against a silently wrong sweep: at α = 1 a row *is* the clean model, so its log-probability
        must equal the clean pass's. Quadratures with an α = 1 node check every problem inside the sweep; for the
        others this runs the first problem of every layer at α = 1 (a handful of rows).

        Raises:
            UpstreamError: When they differ (e.g. a transformers release changed how blocks are called).
        """
        first = {int(layer): p for p, layer in reversed(list(enumerate(problems.layer.tolist())))}
        chosen = torch.tensor([first[layer] for layer in sorted(first)])  # the sweep wants layer order
        one = torch.ones(1, dtype=torch.float64)
        _, _, log_p = self._sweep(problems, chosen, one, torch.zeros(1, dtype=torch.float64), "log_prob")
        self._check_clean(problems, chosen, log_p[:, 0])

    def _check_clean(self, problems: Problems, chunk: torch.Tensor, log_p: torch.Tensor) -> None:
        """Raise when a row at α = 1 (``log_p`` per problem of ``chunk``) differs from the clean model."""
        half = next(self.lm.model.parameters()).dtype in (torch.float16, torch.bfloat16)
        tolerance = 0.5 if half else 1e-3
        for k, p in enumerate(chunk.tolist()):
            clean = self._clean_lp[(int(problems.seq[p]), int(problems.position[p]))]
            got = float(log_p[k])
            if not abs(got - clean) <= tolerance:
                layer = int(problems.layer[p])
                raise upstream_error(
                    self.lm.sites.blocks[layer],
                    f"the fast engine's replay of layer {layer} gives log P = {got:.6g} where the model gives "
                    f"{clean:.6g}: the blocks are called differently than knlight expects",
                )

    def _grouped(self) -> bool:
        """Causal rows of a problem go through a block as one unit unless a 2-D (flash) mask forbids it."""
        return not any(
            isinstance(v, torch.Tensor) and v.dim() == 2
            for call in self._calls
            for k, v in call.kwargs.items()
            if k == "attention_mask"
        )

    def _sweep(
        self,
        problems: Problems,
        chunk: torch.Tensor,
        nodes: torch.Tensor,
        node_w: torch.Tensor,
        objective: str,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Weighted gradient sums ``[chunk, d_ff]``, F and log P(gold) ``[chunk, m]`` of one chunk."""
        lm, sites = self.lm, self.lm.sites
        device, dtype = lm.device, next(lm.model.parameters()).dtype
        m = len(nodes)
        causal = not lm.masked
        # Units: problems sorted by layer (each layer's units contiguous); g rows each (g = m: grouped causal).
        group = m if causal and self._grouped() else 1
        reps = m // group
        unit_seq = problems.seq[chunk].repeat_interleave(reps)
        unit_pos = problems.position[chunk].repeat_interleave(reps)
        unit_layer = problems.layer[chunk].repeat_interleave(reps)
        path = (
            problems.base[chunk].double()[:, None]
            + nodes[None, :, None] * problems.diff[chunk].double()[:, None]
        )
        path = path.reshape(len(unit_seq), group, -1).to(device=device, dtype=dtype)
        if not causal:
            path = path[:, 0]  # masked rows: one row per unit, scaled at its target position
        args = _ChunkArgs(self, unit_seq, unit_pos, group)
        first = int(unit_layer.min())
        bounds = torch.searchsorted(unit_layer, torch.arange(sites.num_layers + 1)).tolist()
        leaves: list[torch.Tensor] = []
        hidden: torch.Tensor | None = None
        for j in range(first, sites.num_layers):
            lo, hi = bounds[j], bounds[j + 1]
            leaf = path[lo:hi].clone().requires_grad_(True) if hi > lo else None
            if leaf is not None:
                leaves.append(leaf)
            if not causal:
                new = None if leaf is None else (unit_seq[lo:hi], unit_pos[lo:hi], leaf)
                hidden = masked_block(self, j, hidden, new, args)
                continue
            call = self._calls[j]
            if leaf is not None:
                # Causal units start as g copies of the target token.
                seq, pos = unit_seq[lo:hi], unit_pos[lo:hi]
                new_rows = call.hidden[seq, pos][:, None, :].expand(-1, group, -1)
                hidden = new_rows if hidden is None else torch.cat([hidden, new_rows])
            assert hidden is not None
            kwargs = args.for_layer(j, hidden.shape[0])
            if leaf is not None:

                def put(h: torch.Tensor, lo: int = lo, leaf: torch.Tensor = leaf) -> torch.Tensor:
                    return torch.cat([h[:lo], leaf.to(h.dtype)])

                with edit_activations(sites.out_projs[j], put):
                    out = sites.blocks[j](hidden, **kwargs)
            else:
                out = sites.blocks[j](hidden, **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        assert hidden is not None
        if causal:
            final = hidden.reshape(-1, hidden.shape[-1])
        else:
            final = hidden[torch.arange(len(unit_seq), device=device), unit_pos.to(device)]
        tokens = problems.token[chunk].repeat_interleave(m).to(device)
        value, log_p, final_grad = head_value_grad(lm, final, tokens, objective, self.head_rows)
        grads = torch.autograd.grad(final, leaves, grad_outputs=final_grad)
        grad = torch.cat(grads).float().cpu().reshape(len(chunk), m, -1)
        grad_sum = (node_w.float()[None, :, None] * grad).sum(1)
        shape = (len(chunk), m)
        return grad_sum, value.float().cpu().reshape(shape), log_p.float().cpu().reshape(shape)


class _ChunkArgs:
    """A chunk's block arguments, re-indexed once per distinct clean tensor and sliced to the active units."""

    def __init__(
        self, engine: FastEngine, unit_seq: torch.Tensor, unit_pos: torch.Tensor, group: int
    ) -> None:
        self.engine, self.unit_seq, self.unit_pos, self.group = engine, unit_seq, unit_pos, group
        self._built: dict[tuple[int, str], Any] = {}
        self._per_unit: set[int] = set()  # ids of the built tensors that have one entry per unit

    def _once(self, key: tuple[int, str], build: Any, per_unit: bool = True) -> Any:
        """``build()`` the first time ``key`` is seen in this chunk (``per_unit``: all its tensors are)."""
        if key not in self._built:
            built = build()
            if per_unit:
                map_tensors(built, lambda t: self._per_unit.add(id(t)))
            self._built[key] = built
        return self._built[key]

    def for_sequence(self, j: int, s: int) -> dict[str, Any]:
        """Block ``j``'s clean call arguments for sequence ``s`` alone (batch 1)."""
        call = self.engine._calls[j]
        batch = call.hidden.shape[0]
        return {
            k: map_tensors(v, lambda x: x[s : s + 1] if x.dim() > 0 and x.shape[0] == batch else x)
            for k, v in call.kwargs.items()
        }

    def for_layer(self, j: int, active: int) -> dict[str, Any]:
        """Block ``j``'s clean call arguments for the first ``active`` units of the chunk."""
        call = self.engine._calls[j]
        batch, width = call.hidden.shape[:2]
        seq = self.unit_seq

        def by_row(x: torch.Tensor) -> torch.Tensor:
            if x.dim() == 0 or x.shape[0] != batch:
                return x
            out = x[seq.to(x.device)]
            self._per_unit.add(id(out))
            return out

        def head(x: Any) -> Any:
            return map_tensors(x, lambda t: t[:active] if id(t) in self._per_unit else t)

        if self.engine.lm.masked:
            return {
                k: head(self._once((id(v), k), lambda v=v: map_tensors(v, by_row), per_unit=False))
                for k, v in call.kwargs.items()
            }
        block = self.engine.lm.sites.blocks[j]
        rows = Rows(block, seq, self.unit_pos, batch, width, self.group)
        kwargs: dict[str, Any] = {}
        for name, value in call.kwargs.items():
            key = (id(value), name)
            if is_cache(value):
                keys, values = self.engine._kv[j]
                rs = seq[:active].to(keys.device)
                kwargs[name] = RowCache(keys[rs, :, : rows.seq_len], values[rs, :, : rows.seq_len])
            elif name == "attention_mask":
                kwargs[name] = head(self._once(key, lambda v=value: rows.mask(v, call.hidden.dtype)))
            elif name == "position_ids":
                kwargs[name] = (
                    None
                    if value is None
                    else head(self._once(key, lambda v=value: rows.per_row("position_ids", v)))
                )
            elif name == "position_embeddings":
                built = self._once(
                    key, lambda v=value: map_tensors(v, lambda x: rows.per_row("position_embeddings", x))
                )
                kwargs[name] = head(built)
            elif name == "cache_position":  # transformers < 5.24: the new tokens' indices in the cache
                kwargs[name] = (
                    None
                    if value is None
                    else torch.arange(rows.seq_len, rows.seq_len + self.group, device=value.device)
                )
            elif name == "alibi":
                alibi = self._once(key, lambda v=value: rows.alibi(v))
                kwargs[name] = alibi[: active * (alibi.shape[0] // len(seq))]
            elif has_axis(value, width):
                raise upstream_error(
                    block,
                    f"argument {name!r} has a sequence axis knlight cannot re-index for single-token rows",
                )
            else:
                kwargs[name] = head(self._once(key, lambda v=value: map_tensors(v, by_row), per_unit=False))
        if not any(is_cache(v) for v in call.kwargs.values()):
            raise upstream_error(
                block, "no transformers Cache among its arguments; cannot sweep single tokens"
            )
        return kwargs
