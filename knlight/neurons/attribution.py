"""Integrated-gradient attribution of FFN neurons: the AMIG baselines and the driver over two engines.

Multi-token answers sum over the answer tokens (each token is its own target position, the gold prefix
teacher-forced for causal LMs). The definitions (quadratures, IG problems, options) are in
:mod:`knlight.neurons.ig`. The driver (:func:`attribute_batch`) turns queries into *IG problems* (one per item
x answer token x layer x baseline) and hands them to an engine (:mod:`knlight.neurons.engines`): ``reference``
(plain autograd, one layer at a time: the oracle) or ``fast`` (same numbers, far fewer FLOPs).

``method`` picks exact IG (``ig``, the default) or a labelled approximation (:mod:`knlight.neurons.approx`):
``steps1_zero`` runs the same engines with the one-node rule α = 0; ``grad_x_act`` and ``joint_ig`` replace the
engine's integration by their own passes. The result names its method (:attr:`Attribution.method`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from knlight.lm.prompts import EncodedQuery
from knlight.neurons.approx import LEFT_ENDPOINT, clean_gradients, joint_path_gradients
from knlight.neurons.engines import make_engine
from knlight.neurons.ig import BASELINES, METHODS, Problems, objective_value, quadrature


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
        method: How the scores were computed: ``ig`` (exact) or an approximation (``grad_x_act``,
            ``steps1_zero``, ``joint_ig``: see :mod:`knlight.neurons.approx`). ``delta`` and ``residual`` are NaN
            for ``grad_x_act`` and ``joint_ig`` (they have no per-layer path to complete).
    """

    scores: torch.Tensor
    layers: list[int]
    prob: torch.Tensor
    delta: torch.Tensor
    residual: torch.Tensor
    method: str = "ig"


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
    method: str = "ig",
    layers: Sequence[int] | None = None,
    steps: int = 20,
    baseline: str = "zero",
    quadrature_name: str = "riemann_right",
    engine: str = "fast",
    objective: str = "prob",
    aggregation: str = "paper",
    chunk_rows: int | str | None = None,
    max_memory_gb: float | None = None,
    completeness: bool = True,
) -> Attribution:
    """Integrated-gradient attribution of every FFN neuron for a batch of (query, answer) items.

    Args:
        lm: A :class:`knlight.LanguageModel`.
        items: ``(query, answer)`` pairs (query with the object slot ``[Y]``) or already encoded queries.
        method: ``ig`` (exact IG, the default) or a labelled approximation: ``grad_x_act`` (gradient x
            activation at the clean point, one forward + one backward), ``steps1_zero`` (gradient at the zero
            activation x activation per layer, EasyEdit's ``steps: 1``; zero baseline only), ``joint_ig`` (all
            layers along one path). ``steps``/``quadrature_name`` apply to ``ig`` and ``joint_ig``, ``engine``
            to ``ig`` and ``steps1_zero``.
        layers: Layers to attribute (default all), in output order.
        steps: Number of quadrature nodes m.
        baseline: ``"zero"`` (Dai et al.) or ``"amig"`` (one baseline per query word: [MASK] / EOS).
        quadrature_name: One of :data:`QUADRATURES`.
        engine: ``"fast"`` or ``"reference"``.
        objective: ``"prob"`` (F = P(y)) or ``"log_prob"``.
        aggregation: For ``amig``: ``"paper"`` sums per-word IG and normalises each layer by the magnitude of
            its sum; ``"code"`` integrates from the averaged baseline with prefactor ā (the AMIG code).
        chunk_rows: Upper bound on rows processed at once by the fast engine (memory knob), or ``"auto"``:
            planned from ``max_memory_gb`` (:mod:`knlight.neurons.memory`).
        max_memory_gb: Budget of ``chunk_rows="auto"`` in GiB (None: 90 % of the device's free memory).
        completeness: Also evaluate F(a') to report the completeness residual (one extra row per problem when
            the quadrature has no α=0 node).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    if baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {BASELINES}")
    if method == "steps1_zero" and baseline != "zero":
        raise ValueError(
            f"method 'steps1_zero' is the gradient at the zero activation: use baseline 'zero', not {baseline!r}"
        )
    if aggregation not in ("paper", "code"):
        raise ValueError(f"unknown aggregation {aggregation!r}; choose 'paper' or 'code'")
    objective_value(torch.zeros(1), objective)  # validates the name early
    num_layers, d_ff = lm.num_layers, lm.d_ff  # type: ignore[attr-defined]
    layer_list = list(range(num_layers)) if layers is None else [int(x) for x in layers]
    bad = [x for x in layer_list if not 0 <= x < num_layers]
    if bad or not layer_list:
        raise ValueError(f"layers {bad or layer_list} out of range: the model has layers 0..{num_layers - 1}")
    alphas, weights = LEFT_ENDPOINT if method == "steps1_zero" else quadrature(quadrature_name, steps)
    encoded = [it if isinstance(it, EncodedQuery) else lm.encode(*it) for it in items]  # type: ignore[attr-defined]
    exact_engine = method in ("ig", "steps1_zero")
    # The approximations run their own passes; the reference engine's clean pass keeps no states for a sweep.
    eng = make_engine(
        engine if exact_engine else "reference", lm, chunk_rows=chunk_rows, max_memory_gb=max_memory_gb
    )

    seqs = [e.input_ids for e in encoded]
    targets = [e.targets for e in encoded]
    if method == "grad_x_act":
        clean, clean_grads = clean_gradients(lm, encoded, layer_list, objective, chunk_rows)
    else:
        clean = eng.clean(seqs, targets, keep=exact_engine)
    layer_idx = torch.tensor(layer_list)
    n = len(encoded)
    scores = torch.zeros(n, len(layer_list), d_ff)
    delta = torch.zeros(n, len(layer_list))
    raw_sum = torch.zeros(n, len(layer_list))

    # One entry per (item, target token, baseline): sequence, target, clean activation ā and path start a'.
    seq_i, pos_i, tok_i, abar_list, base_list, clean_f = [], [], [], [], [], []
    grad_list: list[torch.Tensor] = []  # grad_x_act: the clean-point gradient of each entry
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
                if method == "grad_x_act":
                    grad_list.append(clean_grads[i][k])
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
    if exact_engine:
        grad_sum, f_base = eng.integrate(problems, alphas, weights, objective, need_f0=completeness)
        grad_sum = grad_sum.reshape(n_entries, n_layers, d_ff)
    else:
        completeness = False  # no per-layer path: delta and residual stay NaN
        f_base = torch.full((n_entries * n_layers,), math.nan)
        if method == "grad_x_act":
            grad_sum = torch.stack(grad_list)
        else:
            grad_sum = joint_path_gradients(
                lm, encoded, seq_i, pos_i, tok_i, base, a_bar_all - base, layer_list, alphas, weights,
                objective, chunk_rows,
            )  # fmt: skip
    attr = prefactor * grad_sum
    f_base = f_base.reshape(n_entries, n_layers)
    owner_t = torch.tensor(seq_i)
    scores.index_add_(0, owner_t, attr)
    raw_sum.index_add_(0, owner_t, attr.sum(-1))
    delta.index_add_(0, owner_t, torch.stack(clean_f).float()[:, None] - f_base)
    residual = raw_sum - delta if completeness else torch.full_like(raw_sum, math.nan)
    if baseline == "amig" and aggregation == "paper":
        scores = scores / raw_sum.abs().clamp_min(1e-12)[..., None]
    prob = torch.stack([lp.sum().exp() for lp in clean.log_probs]).float()
    return Attribution(
        scores=scores, layers=layer_list, prob=prob, delta=delta, residual=residual, method=method
    )


def attribute(
    lm: object,
    query: str,
    answer: str,
    *,
    method: str = "ig",
    layers: Sequence[int] | None = None,
    steps: int = 20,
    baseline: str = "zero",
    quadrature: str = "riemann_right",
    engine: str = "fast",
    objective: str = "prob",
    aggregation: str = "paper",
    chunk_rows: int | str | None = None,
    max_memory_gb: float | None = None,
) -> torch.Tensor:
    """Attribution ``[len(layers), d_ff]`` (all layers by default) of one cloze query; see :func:`attribute_batch`.

    Example:
        >>> scores = knlight.attribute(lm, "The capital of France is [Y].", "Paris")  # doctest: +SKIP
    """
    result = attribute_batch(
        lm,
        [(query, answer)],
        method=method,
        layers=layers,
        steps=steps,
        baseline=baseline,
        quadrature_name=quadrature,
        engine=engine,
        objective=objective,
        aggregation=aggregation,
        chunk_rows=chunk_rows,
        max_memory_gb=max_memory_gb,
        completeness=False,
    )
    return result.scores[0]
