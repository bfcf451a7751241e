"""Language-specific neurons by activation statistics: LAPE (Tang et al., ACL 2024, "Language-Specific Neurons:
The Key to Multilingual Capabilities in Large Language Models").

For every neuron and language, the *activation probability* ``P(a > 0)`` over the tokens of that language's
text (here: the queries of the data, run through the model); ``a`` is knlight's neuron, the input of the FFN
output projection (for gated MLPs the product ``act(gate) · up``; the authors hook ``act(gate)`` of Llama,
whose sign is the gate's). A neuron's LAPE is the entropy of its probabilities normalised over the languages:
low entropy = it fires in few languages. Selection as the authors' ``identify.py``:

1. ``bar`` = the ``prob_quantile`` quantile (``kthvalue`` of round(N·q)) of all N·G activation probabilities;
2. a neuron whose probability exceeds ``bar`` in no language is dismissed (entropy +inf);
3. the round(N·``entropy_share``) neurons of lowest entropy are kept;
4. each kept neuron is specific to every language where its probability exceeds ``bar``.

Pure torch, no Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from knlight.lm.hooks import capture_activations
from knlight.lm.prompts import EncodedQuery
from knlight.lm.upstream import base_model_forward
from knlight.neurons.neuron import Neuron

Positions = Literal["all", "target"]


@dataclass
class ActivationCounts:
    """Activation statistics of one language.

    Attributes:
        over_zero: ``[L, d_ff]`` how many counted tokens each neuron was positive at.
        tokens: How many tokens were counted.
    """

    over_zero: torch.Tensor
    tokens: int

    @property
    def probability(self) -> torch.Tensor:
        """``[L, d_ff]`` P(a > 0) over the counted tokens."""
        return self.over_zero.double() / max(self.tokens, 1)


@dataclass
class LapeResult:
    """LAPE neurons of a model over a set of languages.

    Attributes:
        languages: The languages, in the order of the probability tensor's last axis.
        probability: ``[L, d_ff, G]`` activation probabilities.
        entropy: ``[L, d_ff]`` LAPE (entropy of the normalised probabilities; +inf for dismissed neurons).
        bar: The probability a neuron must exceed in a language (the quantile of all probabilities).
        neurons: Per language, its specific neurons (by increasing entropy).
    """

    languages: list[str]
    probability: torch.Tensor
    entropy: torch.Tensor
    bar: float
    neurons: dict[str, list[Neuron]]


def _count_positions(encoded: EncodedQuery, positions: Positions, special: set[int]) -> list[int]:
    if positions == "target":
        return [p for p, _ in encoded.targets]
    return [p for p, token in enumerate(encoded.input_ids) if token not in special]


@torch.no_grad()
def activation_counts(
    lm: Any, encoded: Sequence[EncodedQuery], positions: Positions = "all", batch_size: int = 32
) -> ActivationCounts:
    """Count, per neuron, the tokens of ``encoded`` at which it is positive (special tokens are not counted).

    Args:
        lm: A :class:`knlight.LanguageModel`.
        encoded: The language's encoded queries.
        positions: ``all`` tokens of each query or its ``target`` positions only.
        batch_size: Queries per forward (only the base model runs: the LM head is not needed).
    """
    special = set(getattr(lm.tokenizer, "all_special_ids", []) or [])
    over_zero = torch.zeros(lm.num_layers, lm.d_ff, dtype=torch.long)
    tokens = 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids, attention = lm.pad([e.input_ids for e in chunk])
        count = torch.zeros(ids.shape, dtype=torch.bool)
        for row, e in enumerate(chunk):
            count[row, _count_positions(e, positions, special)] = True
        store: dict[int, torch.Tensor] = {}
        with capture_activations(lm.sites.out_projs, store):
            base_model_forward(lm.model, input_ids=ids.to(lm.device), attention_mask=attention.to(lm.device))
        mask = count.to(lm.device)
        for layer in range(lm.num_layers):
            over_zero[layer] += ((store[layer] > 0) & mask[..., None]).sum((0, 1)).cpu()
        tokens += int(count.sum())
    return ActivationCounts(over_zero, tokens)


def lape(
    counts: Mapping[str, ActivationCounts], entropy_share: float = 0.01, prob_quantile: float = 0.95
) -> LapeResult:
    """LAPE neurons from per-language activation counts (the authors' selection; see the module docstring).

    Raises:
        ValueError: Fewer than two languages, a language without tokens, or a share/quantile outside (0, 1].
    """
    languages = sorted(counts)
    if len(languages) < 2:
        raise ValueError(f"LAPE compares languages: got {languages or 'none'}, need at least two")
    empty = [g for g in languages if counts[g].tokens == 0]
    if empty:
        raise ValueError(f"no tokens counted for language(s) {', '.join(empty)}")
    if not (0 < entropy_share <= 1 and 0 < prob_quantile <= 1):
        raise ValueError(f"entropy_share={entropy_share} and prob_quantile={prob_quantile} must be in (0, 1]")
    prob = torch.stack([counts[g].probability for g in languages], -1)  # [L, d, G]
    total = prob.sum(-1, keepdim=True)
    normed = torch.where(total > 0, prob / total.clamp_min(1e-300), torch.zeros_like(prob))
    entropy = -(normed * torch.where(normed > 0, normed.log(), torch.zeros_like(normed))).sum(-1)
    flat = prob.flatten()
    bar = float(flat.kthvalue(max(1, round(len(flat) * prob_quantile))).values)
    entropy = torch.where((prob > bar).any(-1), entropy, torch.full_like(entropy, float("inf")))
    keep = max(1, round(entropy.numel() * entropy_share))
    # Stable order (entropy, then layer and index) so ties give the same neurons on every machine.
    order = torch.sort(entropy.flatten(), stable=True).indices[:keep].tolist()
    d_ff = entropy.shape[1]
    neurons: dict[str, list[Neuron]] = {g: [] for g in languages}
    for k in order:
        layer, index = divmod(k, d_ff)
        for g, language in enumerate(languages):
            if float(prob[layer, index, g]) > bar:
                neurons[language].append((layer, index))
    return LapeResult(languages, prob, entropy, bar, neurons)


def overlap(a: Sequence[Neuron], b: Sequence[Neuron]) -> dict[str, Any]:
    """``{"a", "b", "both", "jaccard"}`` of two neuron sets."""
    set_a, set_b = set(a), set(b)
    union = set_a | set_b
    return {
        "a": len(set_a),
        "b": len(set_b),
        "both": len(set_a & set_b),
        "jaccard": round(len(set_a & set_b) / len(union), 6) if union else 0.0,
    }
