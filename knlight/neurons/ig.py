"""The pieces of integrated gradients every engine shares: quadratures, IG problems, the objective, the options.

For prompt x, gold object token y and layer l, ``F(a) = P(y | x; h_l <- a)`` at the target position, and

    Attr_l(i) = (ā_i - a'_i) * sum_k w_k dF(a' + α_k (ā - a')) / da_i

with ā the clean activation, a' the baseline and (α_k, w_k) the quadrature (docs/design.md, "Integrated
gradients"). Pure torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from knlight.errors import ConfigError
from knlight.neurons.memory import check_chunk_rows

Quadrature = Literal["riemann_right", "eleuther", "trapezoid", "gauss_legendre"]
Baseline = Literal["zero", "amig"]
Aggregation = Literal["paper", "code"]
Objective = Literal["prob", "log_prob"]
EngineName = Literal["fast", "reference"]
Method = Literal["ig", "grad_x_act", "steps1_zero", "joint_ig"]
QUADRATURES: tuple[str, ...] = ("riemann_right", "eleuther", "trapezoid", "gauss_legendre")
BASELINES: tuple[str, ...] = ("zero", "amig")
METHODS: tuple[str, ...] = ("ig", "grad_x_act", "steps1_zero", "joint_ig")
"""``ig`` is exact; the others are labelled approximations (:mod:`knlight.neurons.approx`)."""


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


def objective_value(log_probs: torch.Tensor, objective: str) -> torch.Tensor:
    """F from log P(y): the probability (default) or the log-probability."""
    if objective == "prob":
        return log_probs.exp()
    if objective == "log_prob":
        return log_probs
    raise ValueError(f"unknown objective {objective!r}; choose 'prob' or 'log_prob'")


@dataclass(frozen=True)
class IGOptions:
    """How integrated gradients are computed (``model.init_args.ig`` in a config)."""

    method: Method = "ig"
    """``ig`` (default: exact per-layer integrated gradients) or a labelled approximation, recorded with the
    results: ``grad_x_act`` (ā·∂F/∂a at the clean point, all layers in one forward and one backward:
    attribution patching at the neuron level), ``steps1_zero`` (ā·∂F/∂a at a = 0, per layer: what EasyEdit's
    ``steps: 1`` configs compute), ``joint_ig`` (IG along one path scaling all attributed layers at once: m
    passes instead of L·m; not per-layer IG). See :mod:`knlight.neurons.approx`."""
    baseline: Baseline = "zero"
    """``zero`` (Dai et al.) or ``amig`` (one baseline per query word: [MASK] for masked LMs, EOS for causal)."""
    aggregation: Aggregation = "paper"
    """For the ``amig`` baseline: ``paper`` (sum the per-word IG, normalise each layer by its sum) or ``code``
    (the AMIG code: one path from the averaged baseline, prefactor ā)."""
    quadrature: Quadrature = "riemann_right"
    """``riemann_right`` (Dai et al.), ``eleuther`` (EleutherAI knowledge-neurons), ``trapezoid`` or
    ``gauss_legendre`` (captum's default)."""
    steps: int = 20
    """Number of quadrature nodes m."""
    objective: Objective = "prob"
    """``prob`` (F = P(answer)) or ``log_prob``."""
    engine: EngineName = "fast"
    """``fast`` (default) or ``reference`` (plain autograd, one layer at a time: the oracle; same numbers)."""
    chunk_rows: int | Literal["auto"] | None = None
    """Upper bound on rows processed at once (a memory knob; results do not depend on it): a number, null for
    the engine's default (64 rows masked, 512 causal), or ``auto``: the fast engine plans its chunks and LM-head
    sub-chunks so the planned peak stays within ``max_memory_gb`` (:mod:`knlight.neurons.memory`)."""
    max_memory_gb: float | None = None
    """Memory budget of ``chunk_rows: auto`` in GiB (everything the attribution allocates beyond the loaded
    model); null: 90 % of what the device has free when the engine starts."""

    def __post_init__(self) -> None:
        if self.steps < 1 or (self.quadrature in ("eleuther", "trapezoid") and self.steps < 2):
            least = 1 if self.quadrature not in ("eleuther", "trapezoid") else 2
            raise ConfigError(
                f"ig.steps={self.steps}: the {self.quadrature} quadrature needs steps >= {least}"
            )
        check_chunk_rows(self.chunk_rows, self.max_memory_gb, "ig", allow_none=True)
        for name, value, choices in (
            ("method", self.method, METHODS),
            ("baseline", self.baseline, BASELINES),
            ("aggregation", self.aggregation, ("paper", "code")),
            ("quadrature", self.quadrature, QUADRATURES),
            ("objective", self.objective, ("prob", "log_prob")),
            ("engine", self.engine, ("fast", "reference")),
        ):
            if value not in choices:
                raise ConfigError(f"ig.{name}={value!r}: choose one of {', '.join(choices)}")
        if self.method == "steps1_zero" and self.baseline != "zero":
            raise ConfigError(
                f"ig.method=steps1_zero is the gradient at the zero activation: set ig.baseline=zero (got "
                f"{self.baseline!r}), or use grad_x_act / joint_ig / ig with the {self.baseline} baseline"
            )

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`knlight.neurons.attribution.attribute_batch`."""
        return dict(
            method=self.method,
            steps=self.steps,
            baseline=self.baseline,
            aggregation=self.aggregation,
            quadrature_name=self.quadrature,
            objective=self.objective,
            engine=self.engine,
            chunk_rows=self.chunk_rows,
            max_memory_gb=self.max_memory_gb,
        )


def gold_log_probs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log P(gold) per row (float32), the normaliser summed in float64: over a 262k-token vocabulary a float32
    log-softmax loses ~1e-4 of the gradient (measured on Gemma 3 270M against a float64 model). Apple's MPS has no
    float64: float32 there."""
    wide = torch.float32 if logits.device.type == "mps" else torch.float64
    return torch.log_softmax(logits.to(wide), dim=-1).gather(-1, tokens[:, None])[:, 0].float()
