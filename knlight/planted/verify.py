"""Verification of a plant: P(object) with the plant, after suppressing its neurons, degenerate semantics, and
the planted neurons' activations on and off their targets. Pure torch, no Lightning."""

from __future__ import annotations

import math
from typing import Any

import torch

from knlight.lm import LanguageModel
from knlight.lm.hooks import capture_activations
from knlight.lm.prompts import EncodedQuery
from knlight.neurons.direct_effect import direct_effects
from knlight.neurons.interventions import answer_log_probs
from knlight.planted.build import Planter
from knlight.planted.config import KINDS
from knlight.planted.model import PlantedModel


def answer_probs(
    lm: LanguageModel, items: list[EncodedQuery], sets: list[list[tuple[int, int]]]
) -> torch.Tensor:
    """``[Q, S]``: P(object) of each query with each neuron set suppressed at the target position."""
    return answer_log_probs(lm, items, sets, factor=0.0).exp()


@torch.no_grad()
def verify_plant(planted: PlantedModel, p_before: torch.Tensor | None = None) -> dict[str, Any]:
    """Measure the plant: P(object) with it, after suppressing the planted neurons, degenerate semantics.

    Suppression is at the target position only (``h_l[i] ← 0``), as in attribution and interventions.

    Returns:
        ``p_clean`` (mean P(object) over all queries) and ``p_clean_min``; ``p_suppressed`` (all planted
        neurons of the fact in that language suppressed; mean and max); ``p_carriers_suppressed`` (carriers
        only); ``p_before`` (the unplanted model, when given); ``degenerate_single`` (P after suppressing one
        member, relative to clean, mean and min over members and records); ``degenerate_both`` (relative,
        mean and max); ``carrier_single`` (P after suppressing one carrier of a standard fact, relative to
        clean, mean and max);
        ``carrier_direct`` (each standard carrier's direct effect on its record's answer — its write removed,
        later sublayers held clean, mean over the queries, in nats: mean, min and the share ≥ 0.1 nats; a carrier
        that writes nothing directly acts through later layers, which no direct-effect selection can recover);
        ``distractor_effect`` (mean |ΔP|/P when a fact's distractors are suppressed); ``off_target_max``
        (largest |h| of a planted neuron away from its own targets, over queries and background) and
        ``on_target_min`` (smallest activation at its own targets).
    """
    lm = planted.lm
    p_clean, p_all, p_carry, single, both, distractor, necessary = [], [], [], [], [], [], []
    direct: list[float] = []
    for rec in planted.records:
        items = [lm.encode(q, rec["object"]) for q in rec["queries"]]
        own = planted.neurons_for(rec["uuid"], rec["language"], KINDS)
        carriers = [(n.layer, n.index) for n in own if n.carrier]
        distract = [(n.layer, n.index) for n in own if not n.carrier]
        deg = [(n.layer, n.index) for n in own if n.kind == "degenerate"]
        standard = [
            (n.layer, n.index) for n in own if n.kind in ("language_independent", "language_specific")
        ]
        sets = [[], carriers + distract, carriers, distract or []]
        if deg:
            sets += [[deg[0]], [deg[1]], deg]
        sets += [[c] for c in standard]
        p = answer_probs(lm, items, sets)  # [Q, S]
        if standard:
            direct += direct_effects(lm, items, standard).mean(0).tolist()
        first = 7 if deg else 4
        necessary += [(p[:, first + j] / p[:, 0]).mean() for j in range(len(standard))]
        p_clean.append(p[:, 0])
        p_all.append(p[:, 1])
        p_carry.append(p[:, 2])
        if distract:
            distractor.append(((p[:, 3] - p[:, 0]).abs() / p[:, 0]).mean())
        if deg:
            single += [(p[:, 4] / p[:, 0]).mean(), (p[:, 5] / p[:, 0]).mean()]
            both.append((p[:, 6] / p[:, 0]).mean())
    clean, sup, carry = torch.cat(p_clean), torch.cat(p_all), torch.cat(p_carry)
    report: dict[str, Any] = {
        "p_clean": float(clean.mean()),
        "p_clean_min": float(clean.min()),
        "p_suppressed": float(sup.mean()),
        "p_suppressed_max": float(sup.max()),
        "p_carriers_suppressed": float(carry.mean()),
    }
    if p_before is not None:
        report["p_before"] = float(p_before.mean())
    if single:
        s, t = torch.stack(single), torch.stack(both)
        report.update(
            degenerate_single_mean=float(s.mean()),
            degenerate_single_min=float(s.min()),
            degenerate_both_mean=float(t.mean()),
            degenerate_both_max=float(t.max()),
        )
    if distractor:
        report["distractor_effect"] = float(torch.stack(distractor).mean())
    if necessary:
        t = torch.stack(necessary)
        report.update(carrier_single_mean=float(t.mean()), carrier_single_max=float(t.max()))
    if direct:
        d = torch.tensor(direct)
        report.update(
            carrier_direct_mean=float(d.mean()),
            carrier_direct_min=float(d.min()),
            carrier_direct_share=float((d >= 0.1).float().mean()),
        )
    return report


@torch.no_grad()
def activation_report(planter: Planter) -> dict[str, float]:
    """Largest off-target |h| and smallest (and mean) on-target h of the planted neurons over the training batch."""
    store: dict[int, torch.Tensor] = {}
    with capture_activations(planter.sites.out_projs, store):
        planter.model(input_ids=planter.batch.ids, attention_mask=planter.batch.attention)
    valid = planter.batch.attention.bool()
    off_max, on_min, on_mean = 0.0, math.inf, []
    for layer, members in planter.by_layer.items():
        idx = torch.tensor([planter.neurons[k].index for k in members])
        acts = store[layer][..., idx].permute(2, 0, 1)
        on = planter.on_mask[members]
        off = valid[None] & ~on
        off_max = max(off_max, float(acts[off].abs().max()))
        on_min = min(on_min, float(acts[on].min()))
        on_mean.append(acts[on])
    return {
        "off_target_max": off_max,
        "on_target_min": on_min,
        "on_target_mean": float(torch.cat(on_mean).mean()),
    }
