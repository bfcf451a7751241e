"""The options of the selection step (``knlight select --kn.* --likn.* --uncertainty.* --dkn.*``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


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


@dataclass(frozen=True)
class KnownOptions:
    """Knowledge filter: a (fact, language, query) counts only where the model knows the fact.

    A query passes when the gold answer's first token is among the model's ``max_rank`` most likely tokens, or
    when P(answer) >= ``min_prob`` (an attributions file written before knlight recorded ranks has only P).
    A (fact, language) is known when at least ``min_queries`` of its queries pass; only the passing queries of
    known languages enter the per-language neurons, LIKN, the uncertainty-aware set, DKN and the carriers.
    The neuron file records, per fact and language, whether it was known and which queries passed, whatever
    ``enabled`` says.
    """

    enabled: bool = True
    """Apply the filter (false: every query counts, as before knlight had it; the status is still recorded)."""
    max_rank: int | None = 10
    """A query passes when the gold first token's rank (1 = the model's top token) is at most this; None: the
    rank is not used."""
    min_prob: float | None = 0.1
    """A query also passes when P(answer) is at least this; None: P is not used."""
    min_queries: int = 1
    """A (fact, language) is known when at least this many of its queries pass."""


@dataclass(frozen=True)
class CarrierOptions:
    """Carriers vs upstream neurons: the direct effect of each candidate neuron's own write on the answer.

    A neuron's *direct effect* is what its write ``a_i · W_out[:, i]`` at the target positions does to log
    P(answer) with every later sublayer (attention and FFN outputs) held at its clean value
    (:mod:`knlight.neurons.direct_effect`): how *necessary* the write is. Its *sufficiency* is what the write
    alone does over the state with every candidate's write removed (a member of a redundant pair is not
    necessary, its twin still writes the answer, but it is sufficient). Per known (fact, language), the
    candidates are its knowledge neurons and the ``top_k`` neurons of highest mean normalised attribution (their
    total effect); *carriers* are the candidates whose carrier score (the larger of the mean direct effect and
    the mean sufficiency over the language's queries) is at least ``threshold`` · the largest and at least
    ``min_effect`` nats; the language's knowledge neurons that are not carriers are its *upstream* neurons.
    Needs the model. The defaults were chosen on planted models (benchmarks/planted.py: seed 0 of gpt2 and
    llama, where unplanted neurons have direct effects below ~0.003 nats; seeds 0 and 2 of bert, where
    unplanted last-layer neurons reach 0.1-0.5 nats and ``threshold`` 0.25 separates them).
    """

    enabled: bool = False
    """Compute ``carriers``, ``upstream`` and the candidates' ``effects``."""
    method: Literal["exact", "linear"] = "exact"
    """``exact``: a patched forward per candidate (the write removed, later sublayers clean); ``linear``: the
    write times the gradient of log P through the clean-held path (one forward and backward per query)."""
    top_k: int = 20
    """Candidates per (fact, language) beside its knowledge neurons: the neurons of highest mean normalised
    attribution."""
    sufficiency: bool = True
    """Also measure each candidate's sufficiency (one more patched forward per query) and score it by the
    larger of the two; false: the direct effect alone (as before the sufficiency, with ``threshold`` 0.1)."""
    threshold: float = 0.25
    """A carrier's score is at least this fraction of the largest candidate's (relative: facts differ in how
    strongly they are held)."""
    min_effect: float = 0.005
    """... and at least this many nats (log P(answer) lost when its write is removed)."""
    chunk_rows: int = 64
    """Patched rows per forward (``exact``)."""


@dataclass(frozen=True)
class SpecificityOptions:
    """Fact-specific vs shared neurons: how many facts, relations and languages select a neuron, and (with the
    model) how much suppressing it moves other facts' answers. Labels ``fact``, ``relation``, ``generic``.

    Counting: a neuron selected (any set) for at least ``min_facts`` facts is ``generic`` when those facts span
    at least ``min_relations`` relations, else ``relation``. Suppression (``suppression: true``): the neuron is
    suppressed on up to ``sample`` known queries of other facts of its relation and of other relations; a mean
    relative drop of P of at least ``spill`` · the drop on its own fact (and at least ``min_drop``) on other
    relations makes it ``generic``, on its relation ``relation``. The stronger of the two labels wins. Lists in
    the neuron file are ordered fact-specific neurons first (then by score).
    """

    enabled: bool = True
    """Label the selected neurons and order them fact-specific first."""
    min_facts: int = 2
    """Selected for at least this many facts: shared."""
    min_relations: int = 2
    """Shared by facts of at least this many relations: generic."""
    suppression: bool = False
    """Also measure the suppression effect on other facts (needs the model)."""
    sample: int = 8
    """Queries of other facts per neuron and group (same relation, other relations), seeded."""
    spill: float = 0.5
    """Other facts' drop, relative to the own fact's, that makes a neuron shared."""
    min_drop: float = 0.1
    """... and the smallest absolute mean relative drop that counts."""
    seed: int = 0
    """Seed of the query sample."""


@dataclass(frozen=True)
class ConsistencyOptions:
    """Consistency across queries (Chen et al., ICLR 2025): per fact and language, the mean pairwise Jaccard of
    its queries' coarse neuron sets; facts split into consistent and inconsistent by Otsu's threshold."""

    enabled: bool = True
    """Compute ``consistency`` per fact and the file's threshold and tables."""


@dataclass(frozen=True)
class LapeOptions:
    """Language-specific neurons by activation statistics (LAPE, Tang et al. 2024), beside LIKN and the KN.

    Per language, the activation probability P(a > 0) of every neuron over the tokens of the language's
    queries (the model is run on them; ``a`` is knlight's neuron, the input of the FFN output projection); a
    neuron's LAPE is the entropy of its probabilities normalised over the languages. As the authors' code: a
    neuron whose probability exceeds the ``prob_quantile`` quantile of all probabilities in no language is
    dismissed, the ``entropy_share`` of neurons with the lowest entropy are kept, each specific to the
    languages where its probability exceeds that quantile. Needs the model.
    """

    enabled: bool = False
    """Compute the LAPE neurons and their overlap with LIKN and the per-language KN."""
    entropy_share: float = 0.01
    """Share of all neurons kept (lowest entropy; the paper: 1 %)."""
    prob_quantile: float = 0.95
    """Quantile of all activation probabilities a neuron must exceed in a language (the authors' 0.95)."""
    positions: Literal["all", "target"] = "all"
    """Count activations at every token of a query (``all``, as over the paper's text) or at its target
    positions only."""
