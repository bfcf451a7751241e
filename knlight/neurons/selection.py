"""From attribution scores to knowledge neurons: thresholds, prompt sharing, uncertainty, LIKN and DKN.

All score tensors are ``[num_layers, d_ff]`` (one query) or ``[Q, num_layers, d_ff]`` (Q queries of one fact).

**Uncertainty-aware aggregation (knlight's MATRICE-style formulation).** MATRICE's exact formulas are not
public, so knlight defines its own and documents it here. Each query's scores are normalised by their maximum
(``Â_q = A_q / max A_q``; a query whose maximum is not positive contributes zeros), so rephrasings and
languages weigh alike. Within a language ``g`` the neuron's score is a lower confidence bound across its
queries, ``LCB_g = mean_q Â_q - κ·std_q Â_q`` (population std; optional weights, e.g. the model's P(answer)
per query, give a weighted mean and std). Across languages the same bound is taken again over the per-language
bounds, ``LCB = mean_g LCB_g - κ·std_g LCB_g``. A neuron is selected when ``LCB > τ·max LCB``. Neurons that
are high for *every* rephrasing and language win; a neuron that is strong in one query only is pulled down by
its spread.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from knlight.lm.prompts import EncodedQuery
from knlight.neurons.interventions import Neuron, answer_log_probs, relative_change_from_log
from knlight.neurons.memory import ChunkRows


def coarse_mask(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """Coarse neurons of one query: ``Attr > τ·max Attr`` (empty when the maximum is not positive or NaN)."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"threshold τ must be in [0, 1], got {tau}")
    if torch.isnan(scores).any():
        raise ValueError("attribution scores contain NaN; recompute them (check the model dtype / inputs)")
    top = scores.max()
    if top <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    return scores > tau * top


def top_k_mask(scores: torch.Tensor, k: int, within: torch.Tensor | None = None) -> torch.Tensor:
    """Keep at most the ``k`` highest-scoring neurons (of ``within`` when given); ties broken by index."""
    flat = scores.flatten().clone()
    if within is not None:
        flat[~within.flatten()] = -torch.inf
    keep = torch.zeros_like(flat, dtype=torch.bool)
    order = torch.argsort(flat, descending=True, stable=True)[:k]
    keep[order] = torch.isfinite(flat[order])
    return keep.view_as(scores)


def sharing_counts(coarse: torch.Tensor) -> torch.Tensor:
    """How many queries ``[Q, L, d]`` select each neuron."""
    return coarse.sum(0)


def refine_by_sharing(coarse: torch.Tensor, p: float) -> torch.Tensor:
    """Refined neurons: coarse in at least a fraction ``p`` of the fact's queries (and in at least one)."""
    if coarse.dim() != 3 or coarse.shape[0] == 0:
        raise ValueError(f"coarse masks must be [Q, L, d] with Q >= 1, got shape {tuple(coarse.shape)}")
    if not 0.0 <= p <= 1.0 + 1e-9:
        raise ValueError(f"sharing fraction p must be in [0, 1], got {p}")
    return sharing_counts(coarse) >= max(p * coarse.shape[0] - 1e-9, 1)


def adaptive_refine(
    coarse: torch.Tensor, p: float = 0.7, min_neurons: int = 2, max_neurons: int = 5, step: float = 0.05
) -> tuple[torch.Tensor, float]:
    """Dai et al.'s adaptive prompt sharing: move p by ``step`` until 2–5 neurons (default) remain.

    p stays in ``(0, 1]``; a neuron must be coarse in at least one query whatever p. Returns the refined mask
    and the p used. When no p yields a count in range (ties, or too few coarse neurons), the p whose count is
    closest to the range wins (smaller p on equal distance).
    """
    if not 0 <= min_neurons <= max_neurons:
        raise ValueError(f"need 0 <= min_neurons <= max_neurons, got {min_neurons}, {max_neurons}")
    if step <= 0:
        raise ValueError(f"step must be positive, got {step}")
    best: tuple[float, float, torch.Tensor] | None = None
    seen = set()
    current = round(p, 10)
    while step / 2 < current <= 1.0 + 1e-9 and current not in seen:
        seen.add(current)
        mask = refine_by_sharing(coarse, current)
        n = int(mask.sum())
        distance = max(min_neurons - n, n - max_neurons, 0)
        if best is None or (distance, current) < (best[0], best[1]):
            best = (distance, current, mask)
        if distance == 0:
            return mask, current
        current = round(current - step if n < min_neurons else current + step, 10)
    assert best is not None
    return best[2], best[1]


def _weighted_lcb(x: torch.Tensor, kappa: float, weights: torch.Tensor | None) -> torch.Tensor:
    w = torch.ones(x.shape[0]) if weights is None else weights.float()
    if (w < 0).any() or w.sum() <= 0:
        raise ValueError("uncertainty weights must be non-negative with a positive sum")
    w = (w / w.sum()).view(-1, *([1] * (x.dim() - 1)))
    mean = (w * x).sum(0)
    std = ((w * (x - mean) ** 2).sum(0)).sqrt()
    return mean - kappa * std


def normalise_per_query(scores: torch.Tensor) -> torch.Tensor:
    """Divide each query's scores by its maximum (queries with a non-positive maximum become zeros)."""
    top = scores.flatten(1).max(1).values.view(-1, *([1] * (scores.dim() - 1)))
    return torch.where(top > 0, scores / top.clamp_min(1e-30), torch.zeros_like(scores))


def uncertainty_scores(
    scores: torch.Tensor,
    kappa: float = 1.0,
    languages: Sequence[str] | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Lower-confidence-bound score ``[L, d]`` of each neuron across queries (and languages); see module doc.

    Args:
        scores: ``[Q, L, d]`` attribution of the fact's queries.
        kappa: Width of the bound (0 gives the plain mean of normalised scores).
        languages: Language of each query; when given, bounds are taken within and then across languages.
        weights: Optional non-negative weight per query (e.g. the model's P(answer)).
    """
    if torch.isnan(scores).any():
        raise ValueError("attribution scores contain NaN; recompute them (check the model dtype / inputs)")
    norm = normalise_per_query(scores)
    if languages is None:
        return _weighted_lcb(norm, kappa, weights)
    if len(languages) != scores.shape[0]:
        raise ValueError(f"{len(languages)} languages given for {scores.shape[0]} queries")
    groups = sorted(set(languages))
    per_language = []
    for g in groups:
        idx = torch.tensor([i for i, lang in enumerate(languages) if lang == g])
        per_language.append(_weighted_lcb(norm[idx], kappa, None if weights is None else weights[idx]))
    return _weighted_lcb(torch.stack(per_language), kappa, None)


def language_independent(masks: Mapping[str, torch.Tensor], min_languages: int | None = None) -> torch.Tensor:
    """Neurons selected in at least ``min_languages`` of the given languages (default: all of them)."""
    if not masks:
        raise ValueError("no language masks given")
    needed = len(masks) if min_languages is None else min_languages
    if not 1 <= needed <= len(masks):
        raise ValueError(f"min_languages must be in 1..{len(masks)}, got {needed}")
    return torch.stack([m.bool() for m in masks.values()]).sum(0) >= needed


def mask_to_neurons(mask: torch.Tensor, scores: torch.Tensor | None = None) -> list[Neuron]:
    """(layer, index) pairs of a mask, sorted by score (desc) when scores are given, else by position."""
    pairs = [(int(a), int(b)) for a, b in mask.nonzero().tolist()]
    if scores is not None:
        pairs.sort(key=lambda n: (-float(scores[n]), n))
    return pairs


@dataclass
class DegenerateResult:
    """DKN search for one fact.

    Attributes:
        candidates: Top-K neurons whose single suppression drops P by at most ``t_low``.
        pairs: Candidate pairs whose joint suppression drops P by more than ``t_high``.
        sets: Larger degenerate sets found by greedy growth (each also minimal: no member can be removed).
        single_drop: Relative drop of each top-K neuron alone.
    """

    candidates: list[Neuron]
    pairs: list[tuple[Neuron, Neuron]]
    sets: list[list[Neuron]]
    single_drop: dict[Neuron, float]


def _drops(
    lm: Any,
    items: Sequence[EncodedQuery],
    sets: list[list[Neuron]],
    chunk_rows: ChunkRows = 256,
    max_memory_gb: float | None = None,
) -> torch.Tensor:
    """Mean relative drop of P(answer) over the items, for each neuron set (suppressed alone).

    Computed from log-probabilities (no underflow); items whose clean P(answer) is 0 are left out of the mean
    (NaN when every item is).
    """
    log_p = answer_log_probs(lm, items, [[], *sets], 0.0, chunk_rows, max_memory_gb)
    drop = -relative_change_from_log(log_p[:, :1], log_p[:, 1:])
    return drop.nanmean(0).float()


def degenerate_neurons(
    lm: Any,
    items: Sequence[EncodedQuery],
    top: Sequence[Neuron],
    t_low: float = 0.2,
    t_high: float = 0.25,
    grow: bool = True,
    max_set_size: int = 4,
    chunk_rows: ChunkRows = 256,
    max_memory_gb: float | None = None,
) -> DegenerateResult:
    """AMIG Algorithm 1 (pairs), plus greedy growth to larger sets.

    The single suppressions of the top-K neurons are evaluated in one batched pass, then the pairs of the
    candidates (singles that drop P by at most ``t_low``) in another.

    Args:
        lm: A :class:`knlight.LanguageModel`.
        items: The fact's encoded queries.
        top: The fact's top-K neurons (AMIG: K = 20).
        t_low: A single whose suppression drops P by at most this (relative) is a candidate.
        t_high: A pair (set) is degenerate when suppressing it drops P by more than this.
        grow: Also search larger sets among candidates not in any pair.
        max_set_size: Largest set the greedy growth builds.
        chunk_rows: Rows (query × neuron set) per forward, or ``"auto"`` (planned from ``max_memory_gb``).
        max_memory_gb: Budget of ``chunk_rows="auto"`` in GiB (None: 90 % of the device's free memory).
    """
    top = list(top)
    drops = functools.partial(_drops, lm, items, chunk_rows=chunk_rows, max_memory_gb=max_memory_gb)
    # Singles first: only pairs of candidates can be degenerate, so the other pairs are never measured.
    single_drops = drops([[n] for n in top])
    single = {n: float(single_drops[i]) for i, n in enumerate(top)}
    candidates = [n for n in top if single[n] <= t_low]
    pair_list = list(itertools.combinations(candidates, 2))
    pair_drops = drops([list(pq) for pq in pair_list]) if pair_list else torch.zeros(0)
    pairs = [pq for k, pq in enumerate(pair_list) if float(pair_drops[k]) > t_high]
    sets: list[list[Neuron]] = []
    if grow:
        in_pair = {n for pq in pairs for n in pq}
        pool = [n for n in candidates if n not in in_pair]
        while len(pool) >= 3:
            chosen = [pool[0]]
            while len(chosen) < max_set_size:
                options = [n for n in pool if n not in chosen]
                if not options:
                    break
                trial = drops([[*chosen, n] for n in options])
                best = int(trial.argmax())
                chosen.append(options[best])
                if float(trial[best]) > t_high:
                    break
            joint = float(drops([chosen])[0])
            minimal = (
                len(chosen) >= 3
                and joint > t_high
                and bool((drops([[m for m in chosen if m != x] for x in chosen]) <= t_high).all())
            )
            if minimal:
                sets.append(chosen)
            pool = [n for n in pool if n not in chosen] if minimal else pool[1:]
    return DegenerateResult(candidates, pairs, sets, single)
