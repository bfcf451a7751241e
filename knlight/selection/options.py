"""The options of the selection step (``knlight select --kn.* --likn.* --uncertainty.* --dkn.*``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KnOptions:
    """Knowledge neurons of one fact in one language (Dai et al.): coarse per query, refined by sharing."""

    threshold: float | None = None
    """Coarse τ: a query's neuron is coarse when its attribution exceeds τ · the query's maximum. None keeps the
    coarse neurons written by the predict run (its ``threshold``/``language_thresholds``). A τ below the
    predict run's needs the dense scores."""
    language_thresholds: dict[str, float] | None = None
    """τ per language overriding ``threshold`` (AMIG: ``{en: 0.3, zh-hans: 0.2}``)."""
    p: float = 0.7
    """Sharing fraction: a neuron is kept when it is coarse in at least p of the fact's queries in the language
    (Dai: 0.7)."""
    adaptive: bool = True
    """Move p by ``p_step`` until the fact keeps ``min_neurons``..``max_neurons`` (Dai's 2–5)."""
    min_neurons: int = 2
    """Lower end of the adaptive range."""
    max_neurons: int = 5
    """Upper end of the adaptive range."""
    p_step: float = 0.05
    """Step of the adaptive search."""
    top_k: int | None = None
    """Keep at most this many refined neurons per (fact, language), the highest mean normalised score (a cap
    beyond Dai et al.: with few queries no p can separate neurons coarse in every query). None keeps them all."""


@dataclass(frozen=True)
class LiknOptions:
    """Language-independent knowledge neurons (LIKN): a fact's neurons shared across languages."""

    min_languages: int | None = None
    """Keep neurons selected in at least this many of the fact's languages. None: in every language of the
    selection (a fact missing a language then has no LIKN), as AMIG's intersection."""


@dataclass(frozen=True)
class UncertaintyOptions:
    """Uncertainty-aware aggregation over queries and languages (needs the dense ``scores.safetensors``)."""

    enabled: bool = False
    """Compute the ``uncertainty`` neurons."""
    kappa: float = 1.0
    """Width of the lower confidence bound ``mean − κ·std`` (0: plain mean of normalised scores)."""
    threshold: float = 0.3
    """Keep neurons whose bound exceeds this fraction of the fact's highest bound."""
    top_k: int | None = 5
    """Keep at most this many (the highest); None keeps all above the threshold."""
    weight_by_prob: bool = False
    """Weight each query by the model's P(answer) (confident queries count more)."""
    allow_top_k_scores: bool = False
    """Accept a scores file saved with ``scores_top_k`` (scores outside each query's top k are taken as 0: an
    approximation)."""


@dataclass(frozen=True)
class DknOptions:
    """Degenerate knowledge neurons (AMIG Algorithm 1, plus greedy growth); loads the model."""

    enabled: bool = False
    """Compute the ``degenerate`` pairs and sets."""
    top_k: int = 20
    """Search among the fact's K highest-ranked neurons (mean normalised attribution over all its queries; AMIG:
    20). Only neurons with a positive score are ranked."""
    t_low: float = 0.2
    """A single neuron whose suppression drops P(answer) by at most this (relative) is a candidate."""
    t_high: float = 0.25
    """A pair (set) is degenerate when suppressing it drops P(answer) by more than this."""
    grow: bool = True
    """Also search sets of 3..``max_set_size`` among candidates not in any pair."""
    max_set_size: int = 4
    """Largest set the greedy growth builds."""
    chunk_rows: int = 256
    """Rows (query × neuron set) per forward."""
