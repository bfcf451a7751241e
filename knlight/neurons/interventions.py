"""Scale neurons at the target positions and measure P(answer): suppress (×0), enhance (×2), batched.

Every function here takes rows ``(query, neuron set, factor)``: the neurons of the set are multiplied by the
factor at the query's target positions only (the positions whose outputs predict the answer tokens), every
other activation is untouched. The LM head is applied at the target positions only, so large vocabularies cost
nothing extra. Pure torch, no Lightning.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch

from knlight.lm.hooks import edit_activations
from knlight.lm.prompts import EncodedQuery
from knlight.lm.upstream import RecordingCache, base_model_forward, last_hidden_state, prefilled_cache
from knlight.neurons.memory import ChunkRows, resolve_chunk_rows
from knlight.neurons.neuron import Neuron, check_neurons

MIN_CACHED_ROWS = 4
"""A causal query with at least this many rows runs its prefix once (KV cache); fewer rows run whole."""


@dataclass(frozen=True)
class Outcome:
    """What the model does on a batch of intervention rows.

    Attributes:
        log_prob: ``[rows]`` log P(answer) (sum over answer tokens, gold prefix teacher-forced), float32.
        top1: ``[rows]`` True where the model's top-1 token at the first target position is the answer's first
            token.
    """

    log_prob: torch.Tensor
    top1: torch.Tensor


def intervene(
    lm: Any,
    rows: Sequence[tuple[EncodedQuery, Sequence[Neuron], float]],
    chunk_rows: ChunkRows = 256,
    prefix_cache: bool | None = None,
    max_memory_gb: float | None = None,
) -> Outcome:
    """Evaluate rows ``(query, neuron set, factor)`` in batched forwards.

    Causal LMs (``prefix_cache``): scaling a neuron at the target positions changes nothing before the first
    target, so each distinct query's prefix is run once and its rows continue from that KV cache with only the
    target positions (exact; about prompt-length times fewer FLOPs in the body, the LM head costs the same);
    queries with fewer than :data:`MIN_CACHED_ROWS` rows run whole, batched together. Masked LMs run whole
    rows. A row's numbers depend only on the rows passed with it; pass the same rows in the same order to get
    the same bits.

    Args:
        lm: A :class:`knlight.LanguageModel` (anything with ``model``, ``sites``, ``num_layers``, ``d_ff``,
            ``pad_token_id``, ``device`` and ``masked``).
        rows: The rows; an empty set (or factor 1) leaves the model unchanged.
        chunk_rows: Rows per forward, or ``"auto"``: as many as fit in ``max_memory_gb``
            (:func:`knlight.neurons.memory.resolve_chunk_rows`, planned for the longest row).
        prefix_cache: Reuse each query's clean prefix (default: for causal LMs).
        max_memory_gb: Budget of ``chunk_rows="auto"`` in GiB (None: 90 % of the device's free memory).

    Returns:
        log P(answer) and top-1 correctness of every row.
    """
    for _, neurons, _ in rows:
        check_neurons(neurons, lm.num_layers, lm.d_ff)
    if prefix_cache is None:
        prefix_cache = not getattr(lm, "masked", True)
    longest = max((len(query.input_ids) for query, _, _ in rows), default=1)
    targets = max((len(query.targets) for query, _, _ in rows), default=1)
    size = resolve_chunk_rows(lm, chunk_rows, longest, targets, max_memory_gb)
    log_prob = torch.empty(len(rows))
    top1 = torch.empty(len(rows), dtype=torch.bool)
    if prefix_cache:
        by_query: dict[EncodedQuery, list[int]] = {}
        for r, (query, _, _) in enumerate(rows):
            by_query.setdefault(query, []).append(r)
        # A query with few rows gains nothing from its own two forwards: those rows run whole, batched.
        few = [r for members in by_query.values() if len(members) < MIN_CACHED_ROWS for r in members]
        chunks = [
            members[i : i + size]
            for members in by_query.values()
            if len(members) >= MIN_CACHED_ROWS
            for i in range(0, len(members), size)
        ]
        chunks += [few[i : i + size] for i in range(0, len(few), size)]
    else:
        chunks = [list(range(i, min(i + size, len(rows)))) for i in range(0, len(rows), size)]
    for chunk in chunks:
        queries = [rows[r][0] for r in chunk]
        sets = [list(rows[r][1]) for r in chunk]
        factors = [rows[r][2] for r in chunk]
        one_query = all(q is queries[0] or q == queries[0] for q in queries)
        if (
            prefix_cache
            and one_query
            and len(chunk) >= MIN_CACHED_ROWS
            and min(p for p, _ in queries[0].targets) > 0
        ):
            lp, t1 = _forward_cached(lm, queries[0], sets, factors)
        else:
            lp, t1 = _forward_rows(lm, queries, sets, factors)
        index = torch.tensor(chunk)
        log_prob[index] = lp
        top1[index] = t1
    return Outcome(log_prob, top1)


def answer_log_probs(
    lm: Any,
    items: Sequence[EncodedQuery],
    neuron_sets: Sequence[Sequence[Neuron]] | None = None,
    factor: float = 0.0,
    chunk_rows: ChunkRows = 256,
    max_memory_gb: float | None = None,
) -> torch.Tensor:
    """log P(answer) of every item under every neuron-set intervention, in batched forwards.

    Args:
        lm: A :class:`knlight.LanguageModel`.
        items: Encoded queries.
        neuron_sets: S sets of (layer, index); each is applied alone (default: one empty set = clean model).
        factor: Multiplier at the target positions (0 suppresses, 2 enhances, 1 leaves unchanged).
        chunk_rows: Rows (item × set) per forward, or ``"auto"`` (see :func:`intervene`).
        max_memory_gb: Budget of ``chunk_rows="auto"`` in GiB.

    Returns:
        ``[len(items), S]`` log-probabilities (sum over answer tokens, gold prefix teacher-forced).
    """
    sets = [list(s) for s in (neuron_sets if neuron_sets is not None else [[]])]
    rows = [(item, s, factor) for item in items for s in sets]
    return intervene(lm, rows, chunk_rows, max_memory_gb=max_memory_gb).log_prob.view(len(items), len(sets))


def _scaling_hooks(
    stack: ExitStack,
    lm: Any,
    rows: list[EncodedQuery],
    sets: list[list[Neuron]],
    factors: list[float],
    offset: int,
) -> None:
    """Scale each row's neurons at its target positions (shifted by ``-offset``) while the stack is open."""
    device = lm.device
    per_layer: dict[int, tuple[list[tuple[int, int, int]], list[float]]] = {}
    for r, (item, neuron_set, factor) in enumerate(zip(rows, sets, factors)):
        if factor == 1.0:
            continue
        for layer, index in dict.fromkeys(neuron_set):  # a neuron listed twice is scaled once
            triples, values = per_layer.setdefault(layer, ([], []))
            for pos, _ in item.targets:
                triples.append((r, pos - offset, index))
                values.append(factor)
    for layer, (triples, values) in per_layer.items():
        idx = torch.tensor(triples, device=device)
        val = torch.tensor(values, device=device)

        def scale(h: torch.Tensor, idx: torch.Tensor = idx, val: torch.Tensor = val) -> torch.Tensor:
            scaled = torch.ones_like(h)
            scaled[idx[:, 0], idx[:, 1], idx[:, 2]] = val.to(h.dtype)
            return h * scaled

        stack.enter_context(edit_activations(lm.sites.out_projs[layer], scale))


@torch.no_grad()
def _forward_rows(
    lm: Any, rows: list[EncodedQuery], sets: list[list[Neuron]], factors: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    device = lm.device
    ids, mask = lm.pad([item.input_ids for item in rows])
    with ExitStack() as stack:
        _scaling_hooks(stack, lm, rows, sets, factors, 0)
        hidden = last_hidden_state(
            lm.model.base_model(input_ids=ids.to(device), attention_mask=mask.to(device))
        )
    return _read_targets(lm, hidden, rows, 0)


@torch.no_grad()
def _forward_cached(
    lm: Any, query: EncodedQuery, sets: list[list[Neuron]], factors: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of one causal query: its clean prefix once, then every row from the first target position on."""
    device = lm.device
    start = min(p for p, _ in query.targets)
    n = len(sets)
    # knlight's own cache (every position of every layer, no sliding-window truncation), read back by type.
    recorded = RecordingCache()
    prefix = torch.tensor([query.input_ids[:start]], device=device)
    base_model_forward(lm.model, recorded, input_ids=prefix, attention_mask=torch.ones_like(prefix))
    cache = prefilled_cache(recorded.recorded, n)
    suffix = torch.tensor([query.input_ids[start:]], device=device).expand(n, -1)
    mask = torch.ones((n, len(query.input_ids)), dtype=torch.long, device=device)
    with ExitStack() as stack:
        _scaling_hooks(stack, lm, [query] * n, sets, factors, start)
        hidden = last_hidden_state(base_model_forward(lm.model, cache, input_ids=suffix, attention_mask=mask))
    return _read_targets(lm, hidden, [query] * n, start)


def _read_targets(
    lm: Any, hidden: torch.Tensor, rows: list[EncodedQuery], offset: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """log P(answer) (summed over answer tokens) and first-token top-1 hit per row, from final states."""
    device = hidden.device
    row_idx = torch.tensor([r for r, item in enumerate(rows) for _ in item.targets], device=device)
    pos_idx = torch.tensor([p - offset for item in rows for p, _ in item.targets], device=device)
    tokens = torch.tensor([t for item in rows for _, t in item.targets], device=device)
    logits = lm.head(hidden[row_idx, pos_idx]).float()
    gold = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0].cpu()
    hit = (logits.argmax(-1) == tokens).cpu()
    counts = [len(item.targets) for item in rows]
    first = torch.tensor([0, *counts[:-1]]).cumsum(0)
    log_prob = torch.stack([part.sum() for part in gold.split(counts)])
    return log_prob, hit[first]


def relative_change(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """ΔP = (P_after - P_before) / P_before; NaN where P_before is 0 (ΔP undefined)."""
    return torch.where(
        before > 0, (after - before) / before.clamp_min(torch.finfo(before.dtype).tiny), torch.nan
    )


def relative_change_from_log(log_before: torch.Tensor, log_after: torch.Tensor) -> torch.Tensor:
    """ΔP = P_after / P_before - 1 computed from log-probabilities (float64; no underflow of tiny P).

    NaN where P_before is 0 (``log_before = -inf``) or either value is NaN: ΔP is undefined there.
    """
    before = log_before.double()
    after = log_after.double()
    change = torch.expm1(after - before)
    return torch.where(torch.isfinite(before) & ~torch.isnan(after), change, torch.nan)


def random_like(
    neurons: Sequence[Neuron], d_ff: int, seed: int | str, exclude: Sequence[Neuron] = ()
) -> list[Neuron]:
    """A random neuron set with the same number of neurons in each layer as ``neurons`` (the random control).

    Indices are drawn without replacement within each layer, avoiding ``neurons`` and ``exclude``; the draw
    depends only on ``seed`` (an int or a string such as ``"0/method/uuid/en"``), never on the global RNG.

    Raises:
        ValueError: When a layer has fewer free neurons than needed.
    """
    rng = random.Random(str(seed))
    taken = set(neurons) | set(exclude)
    per_layer: dict[int, int] = {}
    for layer, _ in neurons:
        per_layer[layer] = per_layer.get(layer, 0) + 1
    out: list[Neuron] = []
    for layer in sorted(per_layer):
        free = [i for i in range(d_ff) if (layer, i) not in taken]
        if len(free) < per_layer[layer]:
            raise ValueError(
                f"cannot draw {per_layer[layer]} random neurons in layer {layer}: only {len(free)} of {d_ff} "
                "are not in the selected set"
            )
        out.extend((layer, i) for i in sorted(rng.sample(free, per_layer[layer])))
    return out
