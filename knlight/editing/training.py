"""Training an edit: which slices learn, the optimizer over them, the loss, and the rows a group must not move.

Loss per training row: ``−log P(new object | edit query) + locality_weight · KL(edited ‖ unedited)`` at the
answer position(s) of its unrelated query; the unedited distribution is computed with the deltas disabled under
``no_grad``. Rows carry weights (see :func:`knlight.editing.plan.schedule`) that make the loss the mean over the
global batch. Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from knlight.editing.options import EditRequests, EditTraining
from knlight.editing.requests import EditRequest
from knlight.editing.scoring import Scorer, answer_log_prob
from knlight.lm import LanguageModel
from knlight.neurons.edits import NeuronEdit

Row = dict[str, Any]
FrozenRows = list[tuple[torch.nn.Parameter, int, torch.Tensor]]
"""``(delta, dim, row indices)``: rows of a delta that must keep their values through an optimizer step."""


def provenance(
    requests: Sequence[EditRequest],
    *,
    model_name: str,
    method: str,
    training: EditTraining,
    options: EditRequests,
    optimizer: dict[str, Any],
) -> dict[str, Any]:
    """What an edit file records of how it was made: the model, the method, the facts (uuid, languages, new
    and old objects, group), the steps, groups, locality weight and the optimizer (its description)."""
    return {
        "model": model_name,
        "method": method,
        "facts": [
            {"uuid": r.uuid, "languages": r.languages, "new": r.new, "old": r.old, "group": r.group}
            for r in requests
        ],
        "steps": training.steps,
        "edits_per_group": options.edits_per_group,
        "locality_weight": training.locality_weight,
        "optimizer": optimizer,
    }


def prepare_edit(
    lm: LanguageModel,
    requests: Sequence[EditRequest],
    *,
    trainable: str,
    metadata: dict[str, Any],
    load_edit: str | None = None,
    allow_other_model: bool = False,
) -> NeuronEdit:
    """The edit to train or evaluate, attached to the model: the saved edit ``load_edit`` (checked to be made on
    this model, ``metadata["model"]`` naming it) or a zero edit of the requests' neurons recording ``metadata``;
    only the slices that learn require gradients (:func:`set_trainable`)."""
    if load_edit:
        model_name = metadata["model"]
        edit = NeuronEdit.load(load_edit, lm, model_name=model_name, allow_other_model=allow_other_model)
    else:
        edit = NeuronEdit.for_model(lm, sorted({n for r in requests for n in r.neurons}), metadata)
    edit.apply(lm)
    set_trainable(edit, trainable)
    return edit


def set_trainable(edit: NeuronEdit, trainable: str) -> None:
    """Only the slices that learn (``in_out``, ``out`` or ``in``) require gradients: the others are no
    parameters the optimizer or DDP sees."""
    edit.out_weight.requires_grad_(trainable != "in")
    for param in (edit.in_weight, edit.in_bias):
        if param is not None:
            param.requires_grad_(trainable != "out")


def make_optimizer(
    edit: NeuronEdit, training: EditTraining, factory: Callable[[Any], torch.optim.Optimizer]
) -> torch.optim.Optimizer:
    """The optimizer over the learning slices only; W_in's in a second parameter group at ``in_lr_scale``
    times the learning rate (one group when the scale is 1 or only one kind of slice learns)."""
    out = [edit.out_weight] if training.trainable != "in" else []
    inp = [p for p in (edit.in_weight, edit.in_bias) if p is not None] if training.trainable != "out" else []
    if training.in_lr_scale == 1.0 or not inp or not out:
        return factory(out + inp)
    optimizer = factory([{"params": out}, {"params": inp}])
    optimizer.param_groups[1]["lr"] = optimizer.defaults["lr"] * training.in_lr_scale
    return optimizer


@dataclass
class EditLoss:
    """The loss of one (per-process) batch and what is logged of it."""

    loss: torch.Tensor
    """What is back-propagated (0 × every delta when the batch holds only padding)."""
    nll: torch.Tensor | None = None
    """Per real row: −log P(new object | edit query)."""
    kl: torch.Tensor | None = None
    """Per real row: KL(edited ‖ unedited) on its unrelated query (0 without one)."""
    rows: int = 0
    """Real (weight > 0) rows in the batch."""

    def logged(self) -> dict[str, torch.Tensor]:
        """What a training step logs: mean NLL, KL and P(new) over the real rows (nothing without any)."""
        if self.nll is None or self.kl is None:
            return {}
        return {
            "train/nll": self.nll.mean(),
            "train/kl": self.kl.mean(),
            "train/p_new": (-self.nll).exp().mean(),
        }


def edit_loss(
    lm: LanguageModel,
    edit: NeuronEdit,
    scorer: Scorer,
    batch: Sequence[Row],
    locality_weight: float,
    world_size: int,
) -> EditLoss:
    """Weighted −log P(new) + locality_weight · KL on a batch's rows (exact global mean under DDP).

    Args:
        lm: The model, with ``edit`` attached.
        edit: The edit being trained.
        scorer: Encodes the queries.
        batch: Schedule rows (``query``, ``answer``, ``weight``, ``loc_query``, ``loc_answer``).
        locality_weight: Weight of the KL term (0: no unrelated forwards).
        world_size: Processes; DDP averages gradients over them, so the loss is scaled to make the sum over
            the global batch its weighted mean.
    """
    device = lm.device
    # Every delta takes part in every step (DDP expects gradients for all of them).
    loss = torch.stack([p.sum() for p in edit.parameters() if p.requires_grad]).sum() * 0.0
    real = [r for r in batch if r["weight"] > 0]
    if not real:
        return EditLoss(loss)
    weights = torch.tensor([r["weight"] for r in real], device=device)
    edit_encoded = [scorer.encode(r["query"], r["answer"]) for r in real]
    with_partner = [k for k, r in enumerate(real) if r["loc_query"] and locality_weight > 0]
    loc_encoded = [scorer.encode(real[k]["loc_query"], real[k]["loc_answer"]) for k in with_partner]
    log_probs = lm.target_log_probs(edit_encoded + loc_encoded)
    nll = -torch.stack([answer_log_prob(lp, e) for lp, e in zip(log_probs, edit_encoded)])
    kl = torch.zeros_like(nll)
    if loc_encoded:
        with torch.no_grad(), edit.disabled():
            base = lm.target_log_probs(loc_encoded)
        edited = log_probs[len(edit_encoded) :]
        per_row = torch.stack([(e.exp() * (e - b)).sum(-1).mean() for e, b in zip(edited, base)])
        kl = kl.index_put((torch.tensor(with_partner, device=device),), per_row)
    loss = loss + world_size * (weights * (nll + locality_weight * kl)).sum()
    return EditLoss(loss, nll, kl, len(real))


def frozen_rows(edit: NeuronEdit | None, requests: Sequence[EditRequest], group: int | None) -> FrozenRows:
    """The rows of the deltas that ``group`` does not own (sequential editing: only its neurons move); none
    without an edit, before the first group or when all requests form one group."""
    if edit is None or group is None or len({r.group for r in requests}) < 2:
        return []
    owned = {n for r in requests if r.group == group for n in r.neurons}
    idx = torch.nonzero(~edit.row_mask(owned)).flatten()
    if not len(idx):
        return []
    params = [(edit.in_weight, 1), (edit.out_weight, 0)]
    if edit.in_bias is not None:
        params.append((edit.in_bias, 1))
    return [(p, dim, idx) for p, dim in params]


@contextmanager
def rows_kept(rows: FrozenRows) -> Iterator[None]:
    """Context (around an optimizer step): the given rows get their exact values back afterwards, whatever the
    optimizer did to them (e.g. weight decay, or Adam's momentum from an earlier group)."""
    saved = [(p, dim, idx, p.detach().index_select(dim, idx).clone()) for p, dim, idx in rows]
    yield
    with torch.no_grad():
        for p, dim, idx, values in saved:
            p.index_copy_(dim, idx, values)
