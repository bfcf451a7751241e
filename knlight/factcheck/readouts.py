"""What the model says about one claim: a one-forward readout and the AMIG attribution. Pure torch.

* :func:`readout`: one forward and one backward, no IG path: log P(candidate) (sum over its tokens, gold prefix
  teacher-forced), the rank of its first token, the neurons' activations at the target positions and their
  gradient × activation;
* :func:`amig_attribution`: the mean IG attribution of the candidate over a neuron set (IG of the set's layers
  only);
* :func:`encode_claim`: a claim's query encoded with its candidate as the answer (errors name the claim).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import torch

from knlight.factcheck.claims import Claim
from knlight.lm.hooks import edit_activations
from knlight.lm.prompts import EncodedQuery, QueryError
from knlight.lm.upstream import last_hidden_state
from knlight.neurons.attribution import attribute_batch
from knlight.neurons.neuron import Neuron


def encode_claim(lm: Any, claim: Claim) -> EncodedQuery:
    """The claim's query encoded with its candidate as the answer.

    Args:
        lm: A :class:`knlight.LanguageModel`.
        claim: The claim.

    Raises:
        QueryError: When the query cannot be encoded; the message names the claim.
    """
    try:
        return lm.encode(claim.query, claim.candidate)
    except QueryError as error:
        raise QueryError(
            f"claim {claim.claim_id} (uuid={claim.uuid!r} language={claim.language!r} query "
            f"{claim.query!r}, candidate {claim.candidate!r}): {error}"
        ) from error


@dataclass
class Readout:
    """What one forward and one backward say about a claim.

    Attributes:
        log_prob: log P(candidate) (sum over its tokens, gold prefix teacher-forced).
        rank: Rank of the candidate's first token among the vocabulary at its target (1 = top prediction;
            ties count in the candidate's favour).
        activation: ``[n]`` activation of each neuron at the target positions (mean over positions).
        grad_x_act: ``[n]`` activation × ∂ log P(answer token)/∂ activation at that token's target position,
            summed over the candidate's tokens.
    """

    log_prob: float
    rank: int
    activation: torch.Tensor
    grad_x_act: torch.Tensor


def readout(lm: Any, encoded: EncodedQuery, neurons: Sequence[Neuron]) -> Readout:
    """log P, rank, activations and gradient × activation of one encoded claim (one forward, no IG path).

    Gradient × activation follows the IG definition of DESIGN.md at α = 1 (it equals one-step right-Riemann IG
    from a zero baseline with ``objective="log_prob"``): answer token k is credited through its own target
    position only, ``Σ_k a_{p_k} · ∂ log P(y_k) / ∂ a_{p_k}`` (one backward per answer token through the
    same graph). Gradients are taken with respect to zero-valued offsets added to each selected layer's
    activation, so every path from that layer to the output counts (also through selected layers above it).

    Args:
        lm: A :class:`knlight.LanguageModel`.
        encoded: The query encoded with the candidate as its answer.
        neurons: The neurons to read (may be empty: only log P and rank).
    """
    layers = sorted({layer for layer, _ in neurons})
    device = lm.device
    ids = torch.tensor([encoded.input_ids], device=device)
    positions = torch.tensor([p for p, _ in encoded.targets], device=device)
    tokens = torch.tensor([t for _, t in encoded.targets], device=device)
    rows = torch.tensor([layers.index(layer) for layer, _ in neurons], dtype=torch.long)
    cols = torch.tensor([index for _, index in neurons], dtype=torch.long)
    acts: dict[int, torch.Tensor] = {}
    offsets: dict[int, torch.Tensor] = {}

    def hook(layer: int) -> Any:
        def edit(h: torch.Tensor) -> torch.Tensor:
            acts[layer] = h.detach()
            offsets[layer] = torch.zeros_like(h, requires_grad=True)
            return h + offsets[layer]

        return edit

    gxa = torch.zeros(len(neurons), dtype=torch.float64)
    with ExitStack() as stack, torch.enable_grad():
        for layer in layers:
            stack.enter_context(edit_activations(lm.sites.out_projs[layer], hook(layer)))
        hidden = last_hidden_state(lm.model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids)))
        logits = lm.head(hidden[0, positions]).float()
        log_p = torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None])[:, 0]
        for k, position in enumerate(positions.tolist()):
            if not neurons:
                break
            retain = k + 1 < len(positions)
            grads = torch.autograd.grad(log_p[k], [offsets[layer] for layer in layers], retain_graph=retain)
            at = torch.stack([g[0, position] for g in grads]).double().cpu()  # [layers, d_ff]
            here = torch.stack([acts[layer][0, position] for layer in layers]).double().cpu()
            gxa += (here * at)[rows, cols]
    rank = 1 + int((logits[0] > logits[0, tokens[0]]).sum())
    if neurons:
        at_targets = torch.stack([acts[layer][0, positions] for layer in layers]).float().cpu()  # [L, K, d]
        activation = at_targets[rows, :, cols].mean(1)
    else:
        activation = torch.zeros(0)
    return Readout(
        log_prob=float(log_p.sum().detach()), rank=rank, activation=activation, grad_x_act=gxa.float()
    )


def amig_attribution(lm: Any, encoded: EncodedQuery, neurons: Sequence[Neuron], **ig_options: Any) -> float:
    """Mean IG attribution of the claim's candidate over ``neurons`` (IG of the neurons' layers only).

    Args:
        lm: A :class:`knlight.LanguageModel`.
        encoded: The query encoded with the candidate as its answer.
        neurons: The relation's set (non-empty).
        ig_options: Passed to :func:`knlight.neurons.attribution.attribute_batch` (steps, baseline, ...).
    """
    if not neurons:
        raise ValueError("the AMIG detector needs a non-empty neuron set")
    layers = sorted({layer for layer, _ in neurons})
    slot = {layer: i for i, layer in enumerate(layers)}
    with torch.enable_grad():
        result = attribute_batch(lm, [encoded], layers=layers, completeness=False, **ig_options)
    rows = torch.tensor([slot[layer] for layer, _ in neurons])
    cols = torch.tensor([index for _, index in neurons])
    return float(result.scores[0][rows, cols].double().mean())
