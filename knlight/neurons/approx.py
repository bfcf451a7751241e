"""Labelled approximations of per-layer integrated gradients: cheaper, not exact, never the default.

Exact IG (``method="ig"``, :mod:`knlight.neurons.ig`) integrates ``F(h_l <- a)`` along ``a' + α(ā - a')`` for each
layer l on its own: L·m scaled passes per target. The approximations here trade that for fewer passes; how far
each lands from exact IG is measured by ``benchmarks/fidelity.py``. With ``ā`` the clean activation at a target
position, ``a'`` the baseline and ``F`` the objective (P or log P of the gold token, one target at a time):

* ``grad_x_act`` (:func:`clean_gradients`): ``(ā - a')·∂F/∂h_l`` at the clean point, every layer from one
  forward and one backward (attribution patching, AtP, at the neuron level; causal LMs run the prefix before
  the target without autograd, so the backward covers the target positions only). The gradient is the total
  derivative (zero offsets are added to every layer's activation, so paths through later layers count); per
  layer it is exactly one-step right-Riemann IG (α = 1 is the clean point).
* ``steps1_zero``: ``ā·∂F/∂a`` at ``a = 0``, per layer (only layer l zeroed at the target): what EasyEdit's
  knowledge-neuron configs with ``steps: 1`` compute (``linspace(0, 1, 1) == [0]``); it runs on the exact
  engines with the one-node rule α = 0, w = 1 (see :data:`LEFT_ENDPOINT`), so it lives in the driver.
* ``joint_ig`` (:func:`joint_path_gradients`): IG of ``F(h_{l1} <- a_1, ..., h_{lk} <- a_k)``, the attributed
  layers' activations at the target replaced *together* along one straight path from the baselines to the clean
  values: m passes per target instead of L·m. Completeness holds jointly (the scores of all layers sum to
  ``F(ā) - F(a')`` with every layer at its baseline), not per layer; paths from a layer through a later
  attributed layer's activation at the same position are not credited (that activation is an input itself).

Causal LMs run the joint path as single rows from the first target position on, over the clean prefix's KV
cache (scaling at a target changes nothing before it). Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import ExitStack
from typing import Any

import torch

from knlight.lm.hooks import capture_activations, edit_activations
from knlight.lm.prompts import EncodedQuery
from knlight.lm.upstream import (
    RecordingCache,
    base_model_forward,
    last_hidden_state,
    prefilled_cache,
    takes_position_ids,
)
from knlight.neurons.ig import METHODS, CleanPass, gold_log_probs, objective_value

APPROXIMATE: tuple[str, ...] = tuple(m for m in METHODS if m != "ig")
"""The approximate methods (every method but ``ig``)."""
LEFT_ENDPOINT = (torch.zeros(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64))
"""``steps1_zero``'s one-node rule: the gradient at α = 0 with weight 1 (EasyEdit's ``steps: 1``)."""
DEFAULT_ROWS = 64
"""Rows per forward when ``chunk_rows`` is not a number (each row one full sequence or one suffix)."""


def _rows_per_chunk(chunk_rows: object) -> int:
    return chunk_rows if isinstance(chunk_rows, int) and chunk_rows > 0 else DEFAULT_ROWS


def _param_dtype(lm: Any) -> torch.dtype:
    return next(lm.model.parameters()).dtype


def clean_gradients(
    lm: Any,
    encoded: Sequence[EncodedQuery],
    layers: Sequence[int],
    objective: str,
    chunk_rows: object = None,
) -> tuple[CleanPass, list[torch.Tensor]]:
    """The clean pass and ``∂F/∂h_l`` at the clean point (``grad_x_act``), from one forward and one backward.

    One row per (query, answer token), F read at that token's target position, the gradient taken at that
    position only (rows are independent, so one backward of the summed objective gives each row its own
    gradient; the gold prefix is teacher-forced as in exact IG). Masked rows are whole sequences; causal rows
    run from their query's first target position on over a KV cache of the prefix (:func:`_gradient_rows`).

    Args:
        lm: A :class:`knlight.LanguageModel`.
        encoded: The encoded queries.
        layers: Layers whose gradients are wanted (the clean activations cover every layer).
        objective: ``prob`` or ``log_prob``.
        chunk_rows: Rows per forward (an int; anything else: :data:`DEFAULT_ROWS`).

    Returns:
        The clean pass (activations of every layer, gold log-probs) and, per query, the gradients
        ``[n_targets, len(layers), d_ff]`` (float32, CPU).
    """
    sites, device, dtype = lm.sites, lm.device, _param_dtype(lm)
    row_seq = [i for i, e in enumerate(encoded) for _ in e.targets]
    row_pos = [p for e in encoded for p, _ in e.targets]
    row_tok = [t for e in encoded for _, t in e.targets]
    acts_out, lp_out, grad_out = [], [], []
    size = _rows_per_chunk(chunk_rows)
    for start in range(0, len(row_seq), size):
        chunk = range(start, min(start + size, len(row_seq)))
        forward, at = _gradient_rows(lm, encoded, [row_seq[r] for r in chunk], [row_pos[r] for r in chunk])
        rows = torch.arange(len(chunk), device=device)
        offsets = [
            torch.zeros(len(chunk), lm.d_ff, device=device, dtype=dtype, requires_grad=True) for _ in layers
        ]
        store: dict[int, torch.Tensor] = {}
        with ExitStack() as stack, torch.enable_grad():
            stack.enter_context(capture_activations(sites.out_projs, store))
            for slot, layer in enumerate(layers):
                # A zero offset at the target keeps every path from h_l to the output (also through later layers).
                def add(
                    h: torch.Tensor,
                    offset: torch.Tensor = offsets[slot],
                    where: tuple[torch.Tensor, torch.Tensor] = (rows, at),
                ) -> torch.Tensor:
                    return h.index_put(where, offset.to(h.dtype), accumulate=True)

                stack.enter_context(edit_activations(sites.out_projs[layer], add))
            hidden = last_hidden_state(forward())
            log_probs = gold_log_probs(
                lm.head(hidden[rows, at]), torch.tensor([row_tok[r] for r in chunk], device=device)
            )
            grads = torch.autograd.grad(objective_value(log_probs, objective).sum(), offsets)
        acts_out.append(
            torch.stack([store[j][rows, at] for j in range(sites.num_layers)], dim=1).float().cpu()
        )
        lp_out.append(log_probs.detach().float().cpu())
        grad_out.append(torch.stack(grads, dim=1).float().cpu())
    counts = [len(e.targets) for e in encoded]
    acts, lps, grads_all = torch.cat(acts_out), torch.cat(lp_out), torch.cat(grad_out)
    return CleanPass(list(acts.split(counts)), list(lps.split(counts))), list(grads_all.split(counts))


def _gradient_rows(
    lm: Any, encoded: Sequence[EncodedQuery], seqs: Sequence[int], positions: Sequence[int]
) -> tuple[Callable[[], Any], torch.Tensor]:
    """The base-model forward of ``grad_x_act``'s rows (row r: query ``seqs[r]``, F read at ``positions[r]``) and
    the index of each row's target position in that forward's output.

    Causal LMs: nothing before a query's first target position depends on a target's activation, so that prefix
    runs once per query without autograd into a KV cache (batched over the chunk's queries, left-padded), and
    each row runs only its query's tokens from there to its own target position over it (the padded prefix
    positions masked out, position ids continuing the query's own). The backward then covers the target
    positions alone; the gradient is the same. Masked LMs (every position sees every other), causal ones whose
    forward takes no ``position_ids``, and prefixes of length 0 run whole padded sequences.
    """
    device = lm.device
    starts = {q: min(p for p, _ in encoded[q].targets) for q in set(seqs)}
    if lm.masked or min(starts.values()) == 0 or not takes_position_ids(lm.model):
        ids, mask = lm.pad([encoded[q].input_ids for q in seqs])
        at = torch.tensor(list(positions), device=device)
        return lambda: lm.model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device)), at
    queries = sorted(starts)
    # Left-padded prefixes: every query's last prefix token sits in the same cache slot, so cache distances
    # equal token distances (sliding-window layers measure them) and the suffix rows line up after it.
    width = max(starts.values())
    prefix_ids = torch.full((len(queries), width), lm.pad_token_id, dtype=torch.long)
    prefix_mask = torch.zeros((len(queries), width), dtype=torch.long)
    for row, q in enumerate(queries):
        prefix_ids[row, width - starts[q] :] = torch.tensor(encoded[q].input_ids[: starts[q]])
        prefix_mask[row, width - starts[q] :] = 1
    recorded = RecordingCache()
    with torch.no_grad():
        base_model_forward(
            lm.model,
            recorded,
            input_ids=prefix_ids.to(device),
            attention_mask=prefix_mask.to(device),
            position_ids=(prefix_mask.cumsum(1) - 1).clamp(min=0).to(device),
        )
    slot = {q: row for row, q in enumerate(queries)}
    row_query = torch.tensor([slot[q] for q in seqs])
    first = torch.tensor([starts[q] for q in seqs])
    suffix_ids, suffix_mask = lm.pad(
        [encoded[q].input_ids[starts[q] : p + 1] for q, p in zip(seqs, positions, strict=True)]
    )
    inputs = {
        "input_ids": suffix_ids.to(device),
        "attention_mask": torch.cat([prefix_mask[row_query], suffix_mask], dim=1).to(device),
        "position_ids": (first[:, None] + torch.arange(suffix_ids.shape[1])).to(device),
    }
    at = torch.tensor(list(positions), device=device) - first.to(device)
    return lambda: base_model_forward(lm.model, prefilled_cache(recorded.recorded, row_query), **inputs), at


def _replaced_objective(
    lm: Any,
    layers: Sequence[int],
    leaves: Sequence[torch.Tensor],
    at: torch.Tensor,
    tokens: torch.Tensor,
    objective: str,
    forward: Callable[[], Any],
) -> torch.Tensor:
    """F per row with ``h_layer[row, at[row]] <- leaves[slot][row]`` for every attributed layer at once."""
    rows = torch.arange(len(at), device=at.device)
    with ExitStack() as stack:
        for slot, layer in enumerate(layers):

            def put(h: torch.Tensor, leaf: torch.Tensor = leaves[slot]) -> torch.Tensor:
                return h.index_put((rows, at), leaf.to(h.dtype))

            stack.enter_context(edit_activations(lm.sites.out_projs[layer], put))
        hidden = last_hidden_state(forward())
    return objective_value(gold_log_probs(lm.head(hidden[rows, at]), tokens), objective)


def joint_path_gradients(
    lm: Any,
    encoded: Sequence[EncodedQuery],
    entry_seq: Sequence[int],
    entry_pos: Sequence[int],
    entry_tok: Sequence[int],
    base: torch.Tensor,
    diff: torch.Tensor,
    layers: Sequence[int],
    alphas: torch.Tensor,
    weights: torch.Tensor,
    objective: str,
    chunk_rows: object = None,
) -> torch.Tensor:
    """``Σ_k w_k ∂F/∂a_l`` along the joint path ``a_l = base_l + α_k·diff_l`` of all ``layers`` (``joint_ig``).

    Args:
        lm: A :class:`knlight.LanguageModel`.
        encoded: The encoded queries ``entry_seq`` indexes into.
        entry_seq: Per entry (query x answer token x baseline), its query.
        entry_pos: Per entry, the target position.
        entry_tok: Per entry, the gold token.
        base: ``[E, len(layers), d_ff]`` path start a' per entry and layer.
        diff: ``[E, len(layers), d_ff]`` path direction ā - a'.
        layers: The attributed layers (scaled together).
        alphas: Quadrature nodes (float64).
        weights: Quadrature weights (float64).
        objective: ``prob`` or ``log_prob``.
        chunk_rows: Rows (entry x node) per forward (an int; anything else: :data:`DEFAULT_ROWS`).

    Returns:
        ``[E, len(layers), d_ff]`` weighted gradient sums (float32, CPU).
    """
    device, dtype, m = lm.device, _param_dtype(lm), len(alphas)
    out = torch.zeros(base.shape, dtype=torch.float32)
    size = max(1, _rows_per_chunk(chunk_rows) // m)
    # Causal LMs: one query at a time over its clean prefix; masked LMs: entries of all queries batched.
    groups = (
        [list(range(len(entry_seq)))]
        if lm.masked
        else [[e for e in range(len(entry_seq)) if entry_seq[e] == q] for q in sorted(set(entry_seq))]
    )
    for group in groups:
        start = 0 if lm.masked else min(p for p, _ in encoded[entry_seq[group[0]]].targets)
        recorded = None
        if not lm.masked and start > 0:
            recorded = RecordingCache()
            prefix = torch.tensor([encoded[entry_seq[group[0]]].input_ids[:start]], device=device)
            with torch.no_grad():
                base_model_forward(
                    lm.model, recorded, input_ids=prefix, attention_mask=torch.ones_like(prefix)
                )
        for first in range(0, len(group), size):
            chunk = torch.tensor(group[first : first + size])
            row_entry = chunk.repeat_interleave(m)
            nodes = alphas.repeat(len(chunk))
            path = base[row_entry].double() + nodes[:, None, None] * diff[row_entry].double()
            leaves = [
                path[:, s].to(device=device, dtype=dtype).requires_grad_(True) for s in range(len(layers))
            ]
            seqs = [encoded[entry_seq[int(e)]].input_ids for e in row_entry]
            at = torch.tensor([entry_pos[int(e)] - start for e in row_entry], device=device)
            tokens = torch.tensor([entry_tok[int(e)] for e in row_entry], device=device)
            forward = _row_forward(lm, seqs, start, recorded)
            with torch.enable_grad():
                value = _replaced_objective(lm, layers, leaves, at, tokens, objective, forward)
                grads = torch.autograd.grad(value.sum(), leaves)
            grad = torch.stack(grads, dim=1).double().cpu().reshape(len(chunk), m, len(layers), -1)
            out[chunk] = (weights[None, :, None, None] * grad).sum(1).float()
    return out


def _row_forward(
    lm: Any, seqs: Sequence[Sequence[int]], start: int, recorded: RecordingCache | None
) -> Callable[[], Any]:
    """The base-model forward of rows: whole padded sequences, or (causal) the tokens from ``start`` on over the
    recorded clean prefix (all rows of a causal chunk belong to one query)."""
    device = lm.device
    if recorded is None:
        ids, mask = lm.pad(seqs)
        return lambda: lm.model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device))
    n, full = len(seqs), list(seqs[0])
    suffix = torch.tensor([full[start:]], device=device).expand(n, -1)
    mask = torch.ones((n, len(full)), dtype=torch.long, device=device)
    return lambda: base_model_forward(
        lm.model, prefilled_cache(recorded.recorded, n), input_ids=suffix, attention_mask=mask
    )
