"""Integrated-gradient attribution of FFN neurons: quadratures, baselines and the driver over two engines.

For prompt x, gold object token y and layer l, ``F(a) = P(y | x; h_l <- a)`` at the target position, and

    Attr_l(i) = (ā_i - a'_i) * sum_k w_k dF(a' + α_k (ā - a')) / da_i

with ā the clean activation, a' the baseline and (α_k, w_k) the quadrature. Multi-token answers sum over the
answer tokens (each token is its own target position, the gold prefix teacher-forced for causal LMs).

The driver (:func:`attribute_batch`) turns queries into *IG problems* (one per item x answer token x layer x
baseline) and hands them to an engine (:mod:`knlight.neurons.engines`): ``reference`` (plain autograd, one layer
at a time: the oracle) or ``fast`` (same numbers, far fewer FLOPs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from knlight.lm.prompts import EncodedQuery

Quadrature = Literal["riemann_right", "eleuther", "trapezoid", "gauss_legendre"]
Baseline = Literal["zero", "amig"]
Aggregation = Literal["paper", "code"]
Objective = Literal["prob", "log_prob"]
EngineName = Literal["fast", "reference"]
QUADRATURES: tuple[str, ...] = ("riemann_right", "eleuther", "trapezoid", "gauss_legendre")
BASELINES: tuple[str, ...] = ("zero", "amig")


def quadrature(name: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes α_k in [0, 1] and weights w_k of a named quadrature (float64).

    ``riemann_right``: α=k/m, k=1..m, w=1/m (Dai et al.). ``eleuther``: α=k/(m-1), k=0..m-1, w=1/m (EleutherAI
    knowledge-neurons). ``trapezoid``: α=k/(m-1) with trapezoid weights. ``gauss_legendre``: Gauss-Legendre
    nodes and weights mapped to [0, 1] (captum's default).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    m = steps
    if name == "riemann_right":
        alphas = torch.arange(1, m + 1, dtype=torch.float64) / m
        weights = torch.full((m,), 1.0 / m, dtype=torch.float64)
    elif name in ("eleuther", "trapezoid"):
        if m < 2:
            raise ValueError(f"quadrature {name!r} needs steps >= 2, got {steps}")
        alphas = torch.arange(m, dtype=torch.float64) / (m - 1)
        if name == "eleuther":
            weights = torch.full((m,), 1.0 / m, dtype=torch.float64)
        else:
            weights = torch.full((m,), 1.0 / (m - 1), dtype=torch.float64)
            weights[0] = weights[-1] = 0.5 / (m - 1)
    elif name == "gauss_legendre":
        nodes, w = np.polynomial.legendre.leggauss(m)
        alphas = torch.from_numpy((nodes + 1) / 2)
        weights = torch.from_numpy(w / 2)
    else:
        raise ValueError(f"unknown quadrature {name!r}; choose one of {QUADRATURES}")
    return alphas, weights


@dataclass
class Problems:
    """A batch of IG problems: integrate F along ``base + α·diff`` at one layer and target.

    Attributes:
        seq: Index of the (clean) input sequence.
        position: Target position in that sequence.
        token: Gold token id at that target.
        layer: Layer whose activation is scaled.
        base: Start of the path ``[P, d_ff]`` (the baseline a').
        diff: Path direction ``[P, d_ff]`` (ā - a').
    """

    seq: torch.Tensor
    position: torch.Tensor
    token: torch.Tensor
    layer: torch.Tensor
    base: torch.Tensor
    diff: torch.Tensor

    def __len__(self) -> int:
        return len(self.seq)


@dataclass
class CleanPass:
    """Clean-model quantities at the target positions.

    Attributes:
        acts: Per sequence, ``[n_targets, num_layers, d_ff]`` activations ā at its target positions.
        log_probs: Per sequence, ``[n_targets]`` log P(gold token) at each target.
    """

    acts: list[torch.Tensor]
    log_probs: list[torch.Tensor]


@dataclass
class Attribution:
    """Result of :func:`attribute_batch` for N items.

    Attributes:
        scores: ``[N, len(layers), d_ff]`` float32 attribution per neuron.
        layers: The attributed layers, in the order of ``scores``' second axis.
        prob: ``[N]`` P(answer) under the clean model (product over answer tokens, gold prefix teacher-forced).
        delta: ``[N, len(layers)]`` F(ā) - F(a') summed over answer tokens (and baselines).
        residual: ``[N, len(layers)]`` completeness residual sum_i Attr - delta (before any normalisation);
            NaN when completeness was not computed.
    """

    scores: torch.Tensor
    layers: list[int]
    prob: torch.Tensor
    delta: torch.Tensor
    residual: torch.Tensor


def objective_value(log_probs: torch.Tensor, objective: str) -> torch.Tensor:
    """F from log P(y): the probability (default) or the log-probability."""
    if objective == "prob":
        return log_probs.exp()
    if objective == "log_prob":
        return log_probs
    raise ValueError(f"unknown objective {objective!r}; choose 'prob' or 'log_prob'")


def baseline_sequences(encoded: EncodedQuery, replacement_id: int) -> list[tuple[int, ...]]:
    """AMIG baseline inputs: the query with one word at a time replaced by ``replacement_id`` (token by token)."""
    out = []
    for word in encoded.words:
        ids = list(encoded.input_ids)
        for pos in word:
            if pos < len(ids):
                ids[pos] = replacement_id
        out.append(tuple(ids))
    return out


def attribute_batch(
    lm: object,
    items: Sequence[tuple[str, str] | EncodedQuery],
    *,
    layers: Sequence[int] | None = None,
    steps: int = 20,
    baseline: str = "zero",
    quadrature_name: str = "riemann_right",
    engine: str = "fast",
    objective: str = "prob",
    aggregation: str = "paper",
    chunk_rows: int | None = None,
    completeness: bool = True,
) -> Attribution:
    """Integrated-gradient attribution of every FFN neuron for a batch of (query, answer) items.

    Args:
        lm: A :class:`knlight.LanguageModel`.
        items: ``(query, answer)`` pairs (query with the object slot ``[Y]``) or already encoded queries.
        layers: Layers to attribute (default all), in output order.
        steps: Number of quadrature nodes m.
        baseline: ``"zero"`` (Dai et al.) or ``"amig"`` (one baseline per query word: [MASK] / EOS).
        quadrature_name: One of :data:`QUADRATURES`.
        engine: ``"fast"`` or ``"reference"``.
        objective: ``"prob"`` (F = P(y)) or ``"log_prob"``.
        aggregation: For ``amig``: ``"paper"`` sums per-word IG and normalises each layer by the magnitude of
            its sum; ``"code"`` integrates from the averaged baseline with prefactor ā (the AMIG code).
        chunk_rows: Upper bound on rows processed at once by the fast engine (memory knob).
        completeness: Also evaluate F(a') to report the completeness residual (one extra row per problem when
            the quadrature has no α=0 node).
    """
    from knlight.neurons.engines import make_engine

    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {BASELINES}")
    if aggregation not in ("paper", "code"):
        raise ValueError(f"unknown aggregation {aggregation!r}; choose 'paper' or 'code'")
    objective_value(torch.zeros(1), objective)  # validates the name early
    num_layers, d_ff = lm.num_layers, lm.d_ff  # type: ignore[attr-defined]
    layer_list = list(range(num_layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layer_list if not 0 <= x < num_layers]
    if bad or not layer_list:
        raise ValueError(f"layers {bad or layer_list} out of range: the model has layers 0..{num_layers - 1}")
    alphas, weights = quadrature(quadrature_name, steps)
    encoded = [it if isinstance(it, EncodedQuery) else lm.encode(*it) for it in items]  # type: ignore[attr-defined]
    eng = make_engine(engine, lm, chunk_rows=chunk_rows)

    seqs = [e.input_ids for e in encoded]
    targets = [e.targets for e in encoded]
    clean = eng.clean(seqs, targets, keep=True)
    layer_idx = torch.tensor(layer_list)
    n = len(encoded)
    scores = torch.zeros(n, len(layer_list), d_ff)
    delta = torch.zeros(n, len(layer_list))
    raw_sum = torch.zeros(n, len(layer_list))

    # One entry per (item, target token, baseline): sequence, target, clean activation ā and path start a'.
    seq_i, pos_i, tok_i, abar_list, base_list, clean_f = [], [], [], [], [], []
    word_bases: list[list[torch.Tensor]] = []
    if baseline == "amig":
        base_seqs, owner = [], []
        for i, e in enumerate(encoded):
            variants = baseline_sequences(e, lm.baseline_token_id)  # type: ignore[attr-defined]
            if not variants:
                raise ValueError(
                    f"item {i} ({e.input_ids}) has no query word to replace for the AMIG baseline"
                )
            base_seqs.extend(variants)
            owner.extend([i] * len(variants))
        base_clean = eng.clean(base_seqs, [targets[i] for i in owner])
        word_bases = [
            [base_clean.acts[j] for j, o in enumerate(owner) if o == i] for i in range(len(encoded))
        ]
    for i, e in enumerate(encoded):
        for k, (pos, tok) in enumerate(e.targets):
            a_bar = clean.acts[i][k][layer_idx].float()
            if baseline == "zero":
                bases = [torch.zeros_like(a_bar)]
            else:
                bases = [acts[k][layer_idx].float() for acts in word_bases[i]]
                if aggregation == "code":
                    bases = [torch.stack(bases).mean(0)]
            for b in bases:
                seq_i.append(i)
                pos_i.append(pos)
                tok_i.append(tok)
                abar_list.append(a_bar)
                base_list.append(b)
                clean_f.append(objective_value(clean.log_probs[i][k].float(), objective))

    # Expand entries over layers: problem p = (entry, layer slot).
    n_entries, n_layers = len(seq_i), len(layer_list)
    a_bar_all, base = torch.stack(abar_list), torch.stack(base_list)  # [E, Lsel, d_ff]
    problems = Problems(
        seq=torch.tensor(seq_i).repeat_interleave(n_layers),
        position=torch.tensor(pos_i).repeat_interleave(n_layers),
        token=torch.tensor(tok_i).repeat_interleave(n_layers),
        layer=layer_idx.repeat(n_entries),
        base=base.reshape(-1, d_ff),
        diff=(a_bar_all - base).reshape(-1, d_ff),
    )
    # AMIG's code multiplies by ā instead of (ā - a').
    prefactor = a_bar_all if aggregation == "code" and baseline == "amig" else a_bar_all - base
    grad_sum, f_base = eng.integrate(problems, alphas, weights, objective, need_f0=completeness)
    attr = prefactor * grad_sum.reshape(n_entries, n_layers, d_ff)
    f_base = f_base.reshape(n_entries, n_layers)
    owner_t = torch.tensor(seq_i)
    scores.index_add_(0, owner_t, attr)
    raw_sum.index_add_(0, owner_t, attr.sum(-1))
    delta.index_add_(0, owner_t, torch.stack(clean_f).float()[:, None] - f_base)
    residual = raw_sum - delta if completeness else torch.full_like(raw_sum, math.nan)
    if baseline == "amig" and aggregation == "paper":
        scores = scores / raw_sum.abs().clamp_min(1e-12)[..., None]
    prob = torch.stack([lp.sum().exp() for lp in clean.log_probs]).float()
    return Attribution(scores=scores, layers=layer_list, prob=prob, delta=delta, residual=residual)


def attribute(
    lm: object,
    query: str,
    answer: str,
    *,
    layers: Sequence[int] | None = None,
    steps: int = 20,
    baseline: str = "zero",
    quadrature: str = "riemann_right",
    engine: str = "fast",
    objective: str = "prob",
    aggregation: str = "paper",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Attribution ``[len(layers), d_ff]`` (all layers by default) of one cloze query; see :func:`attribute_batch`.

    Example:
        >>> scores = knlight.attribute(lm, "The capital of France is [Y].", "Paris")  # doctest: +SKIP
    """
    result = attribute_batch(
        lm,
        [(query, answer)],
        layers=layers,
        steps=steps,
        baseline=baseline,
        quadrature_name=quadrature,
        engine=engine,
        objective=objective,
        aggregation=aggregation,
        chunk_rows=chunk_rows,
        completeness=False,
    )
    return result.scores[0]
