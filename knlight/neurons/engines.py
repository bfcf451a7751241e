"""IG engines: ``reference`` (the oracle: plain autograd, one layer at a time) and ``fast`` (same numbers).

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

from knlight.neurons.attribution import CleanPass, Problems, objective_value
from knlight.neurons.hooks import capture_activations, edit_activations


def make_engine(name: str, lm: Any, chunk_rows: int | None = None) -> ReferenceEngine | FastEngine:
    """Build the engine called ``name`` (``"fast"`` or ``"reference"``)."""
    if name == "reference":
        return ReferenceEngine(lm)
    if name == "fast":
        return FastEngine(lm, chunk_rows=chunk_rows)
    raise ValueError(f"unknown engine {name!r}; choose 'fast' or 'reference'")


def _gold_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None])[:, 0]


class ReferenceEngine:
    """Plain and obviously right: full model forward of m scaled copies per (problem), full logits."""

    def __init__(self, lm: Any) -> None:
        self.lm = lm

    def clean(
        self, seqs: Sequence[Sequence[int]], targets: Sequence[Sequence[tuple[int, int]]], keep: bool = False
    ) -> CleanPass:
        """Clean activations and gold log-probs; ``keep`` makes these the sequences problems index into."""
        sites, model = self.lm.sites, self.lm.model
        if keep:
            self._seqs = list(seqs)
        acts, log_probs = [], []
        for seq, tgt in zip(seqs, targets):
            store: dict[int, torch.Tensor] = {}
            with torch.no_grad(), capture_activations(sites.out_projs, store):
                logits = model(input_ids=torch.tensor([list(seq)], device=self.lm.device)).logits[0]
            pos = torch.tensor([p for p, _ in tgt])
            acts.append(torch.stack([store[layer][0, pos] for layer in range(sites.num_layers)], dim=1))
            log_probs.append(
                _gold_log_probs(logits[pos], torch.tensor([t for _, t in tgt], device=logits.device))
            )
        return CleanPass(acts, log_probs)

    def integrate(
        self, problems: Problems, alphas: torch.Tensor, weights: torch.Tensor, objective: str, need_f0: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sites, model, device = self.lm.sites, self.lm.model, self.lm.device
        dtype = next(model.parameters()).dtype
        grad_sum = torch.zeros(len(problems), problems.base.shape[1])
        f0 = torch.full((len(problems),), float("nan"))
        nodes = torch.cat([alphas, torch.zeros(1, dtype=alphas.dtype)]) if need_f0 else alphas
        for p in range(len(problems)):
            seq = self._seqs[int(problems.seq[p])]
            t, y, layer = int(problems.position[p]), int(problems.token[p]), int(problems.layer[p])
            path = problems.base[p].double() + nodes[:, None] * problems.diff[p].double()
            leaf = path.to(device=device, dtype=dtype).requires_grad_(True)

            def replace(h: torch.Tensor, leaf: torch.Tensor = leaf, t: int = t) -> torch.Tensor:
                h = h.clone()
                h[:, t, :] = leaf
                return h

            with edit_activations(sites.out_projs[layer], replace):
                ids = torch.tensor([list(seq)] * len(nodes), device=device)
                logits = model(input_ids=ids).logits[:, t]
            value = objective_value(
                _gold_log_probs(logits, torch.full((len(nodes),), y, device=device)), objective
            )
            (grad,) = torch.autograd.grad(value.sum(), leaf)
            m = len(alphas)
            grad_sum[p] = (weights[:, None] * grad[:m].double().cpu()).sum(0).float()
            if need_f0:
                f0[p] = value[-1].detach().float().cpu()
        return grad_sum, f0


# ----------------------------------------------------------------------------------------------------------
# Fast engine
# ----------------------------------------------------------------------------------------------------------


class _RowCache:
    """Duck-typed KV cache: per row, the clean keys/values of the positions before its target."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys, self.values = keys, values

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any):
        return torch.cat([self.keys, key], dim=-2), torch.cat([self.values, value], dim=-2)


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

    # -- clean pass -----------------------------------------------------------------------------------------

    def _forward_clean(self, seqs: Sequence[Sequence[int]], keep_states: bool) -> tuple[torch.Tensor, dict]:
        lm = self.lm
        sites, device = lm.sites, lm.device
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), lm.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):  # right padding: exact for causal LMs, masked out for masked LMs
            ids[r, : len(s)] = torch.tensor(list(s))
            mask[r, : len(s)] = 1
        store: dict[int, torch.Tensor] = {}
        calls: dict[int, _BlockCall] = {}
        handles = []
        if keep_states:
            for j, block in enumerate(sites.blocks):

                def pre_hook(module: nn.Module, args: tuple, kwargs: dict, j: int = j) -> None:
                    calls[j] = _BlockCall(module, args, kwargs)

                handles.append(block.register_forward_pre_hook(pre_hook, with_kwargs=True))
        extra: dict[str, Any] = {}
        if keep_states and not lm.masked:
            from transformers import DynamicCache

            # A cache without config keeps every position of every layer (no sliding-window truncation).
            extra = {"use_cache": True, "past_key_values": DynamicCache()}
        try:
            with torch.no_grad(), capture_activations(sites.out_projs, store):
                out = lm.model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device), **extra)
        finally:
            for handle in handles:
                handle.remove()
        if keep_states:
            self._calls = [calls[j] for j in range(sites.num_layers)]
            if not lm.masked:
                cache = out.past_key_values
                self._kv = [(layer.keys, layer.values) for layer in cache.layers]
        return out.last_hidden_state, store

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
            log_probs = _gold_log_probs(self._logits(hidden, final_norm=False), tokens).cpu()
        acts_all = torch.stack([store[layer][rows, pos] for layer in range(sites.num_layers)], dim=1).cpu()
        counts = [len(tgt) for tgt in targets]
        return CleanPass(list(acts_all.split(counts)), list(log_probs.split(counts)))

    def _logits(self, hidden: torch.Tensor, final_norm: bool = True) -> torch.Tensor:
        sites = self.lm.sites
        if final_norm and sites.final_norm is not None:
            hidden = sites.final_norm(hidden)
        logits = sites.head(hidden)
        if sites.logit_softcap:
            logits = torch.tanh(logits / sites.logit_softcap) * sites.logit_softcap
        return logits

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
        per_chunk = max(1, self.chunk_rows // m)
        for start in range(0, len(order), per_chunk):
            chunk = order[start : start + per_chunk]
            g, f = self._sweep(problems, chunk, nodes, node_w, objective)
            grad_sum[chunk] = g
            if need_f0:
                f0[chunk] = f[:, -1]
        return grad_sum, f0

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
        value = objective_value(_gold_log_probs(self._logits(final), row_tok.to(device)), objective)
        grads = torch.autograd.grad(value.sum(), leaves)
        grad = torch.cat(grads).float().cpu().reshape(len(chunk), m, -1)
        grad_sum = (node_w.float()[None, :, None] * grad).sum(1)
        return grad_sum, value.detach().float().cpu().reshape(len(chunk), m)

    def _kwargs(self, j: int, row_seq: torch.Tensor, row_pos: torch.Tensor) -> dict[str, Any]:
        """Block ``j``'s clean call arguments, re-indexed for the active rows."""
        call = self._calls[j]
        batch = call.hidden.shape[0]
        device = call.hidden.device

        def by_row(x: torch.Tensor) -> torch.Tensor:
            return x[row_seq.to(x.device)] if x.dim() > 0 and x.shape[0] == batch else x

        if self.lm.masked:
            return {k: _map_tensors(v, by_row) for k, v in call.kwargs.items()}

        # Causal single-token rows: row r is position t_r attending to the clean keys/values before it.
        seq_len = int(row_pos.max())
        kwargs: dict[str, Any] = {}
        for name, value in call.kwargs.items():
            if name in ("past_key_values", "layer_past"):
                keys, values = self._kv[j]
                rs = row_seq.to(keys.device)
                kwargs[name] = _RowCache(keys[rs, :, :seq_len], values[rs, :, :seq_len])
            elif name == "attention_mask":
                kwargs[name] = self._row_mask(j, row_pos, seq_len, call.hidden.dtype, device)
            elif name == "position_ids":
                kwargs[name] = row_pos[:, None].to(device)
            elif name == "cache_position":
                kwargs[name] = torch.tensor([seq_len], device=device) if value is not None else None
            elif name == "alibi":
                kwargs[name] = self._row_alibi(row_pos, seq_len, call.hidden.dtype, device)
            elif name == "position_embeddings":

                def at_pos(x: torch.Tensor) -> torch.Tensor:
                    idx = row_seq if x.shape[0] == batch else torch.zeros_like(row_seq)
                    return x[idx.to(x.device), row_pos.to(x.device)][:, None]

                kwargs[name] = _map_tensors(value, at_pos)
            else:
                kwargs[name] = _map_tensors(value, by_row)
        if "past_key_values" not in kwargs and "layer_past" not in kwargs:
            raise TypeError(
                f"{type(self.lm.sites.blocks[j]).__name__} takes no KV cache; cannot sweep single tokens"
            )
        return kwargs

    def _row_mask(
        self, j: int, row_pos: torch.Tensor, seq_len: int, dtype: torch.dtype, device: Any
    ) -> torch.Tensor:
        config = self.lm.model.config
        key_pos = torch.arange(seq_len)
        allowed = key_pos[None, :] < row_pos[:, None]
        layer_types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        if layer_types is not None and window and layer_types[j] == "sliding_attention":
            allowed &= key_pos[None, :] > row_pos[:, None] - window
        allowed = torch.cat([allowed, torch.ones(len(row_pos), 1, dtype=torch.bool)], dim=1)
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
        return mask[:, None, None, :].to(device)

    def _row_alibi(
        self, row_pos: torch.Tensor, seq_len: int, dtype: torch.dtype, device: Any
    ) -> torch.Tensor:
        from transformers.models.bloom.modeling_bloom import build_alibi_tensor

        heads = self.lm.model.config.n_head
        slopes = build_alibi_tensor(torch.ones(1, 2), heads, torch.float32)[:, 0, 1]  # slope_h * 1
        key_pos = torch.cat([torch.arange(seq_len)[None].expand(len(row_pos), -1), row_pos[:, None]], dim=1)
        alibi = slopes[None, :, None] * key_pos[:, None, :].float()  # [R, H, K]
        return alibi.reshape(len(row_pos) * heads, 1, -1).to(device=device, dtype=dtype)
