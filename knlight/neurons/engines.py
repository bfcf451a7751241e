"""IG engines: ``reference`` (the oracle: plain autograd, one layer at a time) and ``fast`` (same numbers).

Both compute, for a batch of :class:`~knlight.neurons.ig.Problems`, ``sum_k w_k dF/da`` along
``a = base + α_k·diff`` at one layer and one target position, plus F at α=0 (for the completeness residual).
The fast engine lives in :mod:`knlight.neurons.fast_engine`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from knlight.lm.hooks import capture_activations, edit_activations
from knlight.neurons.ig import CleanPass, Problems, gold_log_probs, objective_value

if TYPE_CHECKING:
    from knlight.neurons.fast_engine import FastEngine


def make_engine(
    name: str, lm: Any, chunk_rows: int | str | None = None, max_memory_gb: float | None = None
) -> ReferenceEngine | FastEngine:
    """Build the engine called ``name`` (``"fast"`` or ``"reference"``; ``chunk_rows``/``max_memory_gb``: the
    fast engine's memory knobs)."""
    if name == "reference":
        return ReferenceEngine(lm)
    if name == "fast":
        from knlight.neurons.fast_engine import FastEngine

        return FastEngine(lm, chunk_rows=chunk_rows, max_memory_gb=max_memory_gb)
    raise ValueError(f"unknown engine {name!r}; choose 'fast' or 'reference'")


class ReferenceEngine:
    """Plain and obviously right: full model forward of m scaled copies per (problem), full logits."""

    def __init__(self, lm: Any) -> None:
        self.lm = lm

    def clean(
        self, seqs: Sequence[Sequence[int]], targets: Sequence[Sequence[tuple[int, int]]], keep: bool = False
    ) -> CleanPass:
        """Clean activations and gold log-probs; ``keep`` makes these the sequences problems index into."""
        sites, model = self.lm.sites, self.lm.model
        if keep:
            self._seqs = list(seqs)
        acts, log_probs = [], []
        for seq, tgt in zip(seqs, targets):
            store: dict[int, torch.Tensor] = {}
            with torch.no_grad(), capture_activations(sites.out_projs, store):
                logits = model(input_ids=torch.tensor([list(seq)], device=self.lm.device)).logits[0]
            pos = torch.tensor([p for p, _ in tgt])
            acts.append(torch.stack([store[layer][0, pos] for layer in range(sites.num_layers)], dim=1))
            log_probs.append(
                gold_log_probs(logits[pos], torch.tensor([t for _, t in tgt], device=logits.device))
            )
        return CleanPass(acts, log_probs)

    def integrate(
        self, problems: Problems, alphas: torch.Tensor, weights: torch.Tensor, objective: str, need_f0: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        sites, model, device = self.lm.sites, self.lm.model, self.lm.device
        dtype = next(model.parameters()).dtype
        grad_sum = torch.zeros(len(problems), problems.base.shape[1])
        f0 = torch.full((len(problems),), float("nan"))
        nodes = torch.cat([alphas, torch.zeros(1, dtype=alphas.dtype)]) if need_f0 else alphas
        for p in range(len(problems)):
            seq = self._seqs[int(problems.seq[p])]
            t, y, layer = int(problems.position[p]), int(problems.token[p]), int(problems.layer[p])
            path = problems.base[p].double() + nodes[:, None] * problems.diff[p].double()
            leaf = path.to(device=device, dtype=dtype).requires_grad_(True)

            def replace(h: torch.Tensor, leaf: torch.Tensor = leaf, t: int = t) -> torch.Tensor:
                h = h.clone()
                h[:, t, :] = leaf
                return h

            with edit_activations(sites.out_projs[layer], replace):
                ids = torch.tensor([list(seq)] * len(nodes), device=device)
                logits = model(input_ids=ids).logits[:, t]
            value = objective_value(
                gold_log_probs(logits, torch.full((len(nodes),), y, device=device)), objective
            )
            (grad,) = torch.autograd.grad(value.sum(), leaf)
            m = len(alphas)
            grad_sum[p] = (weights[:, None] * grad[:m].double().cpu()).sum(0).float()
            if need_f0:
                f0[p] = value[-1].detach().float().cpu()
        return grad_sum, f0
