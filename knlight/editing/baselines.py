"""The training-free methods evaluated beside an edit, and the methods an evaluation compares.

Methods: ``unedited`` (the frozen model), ``edited`` (the trained :class:`~knlight.neurons.edits.NeuronEdit`)
and the baselines chosen in the config:

* ``direct``: Dai et al.'s ``W_out[:, n] += λ_new·E(new) − λ_old·E(old)`` on each request's neurons
  (:func:`~knlight.neurons.edits.direct_edit`);
* ``suppress`` / ``enhance``: the requests' neurons ×0 / ×2 at every position
  (:func:`~knlight.neurons.edits.scale_edit`);
* in ``enhance`` mode the method is ``enhanced`` (the facts' neurons × ``enhance_factor``) and the baseline
  ``random`` is ``enhanced_random`` (the random-rule neurons scaled alike).

Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from knlight.editing.measures import row_measures
from knlight.editing.options import BASELINES, DirectEdit
from knlight.editing.plan import EditPlan
from knlight.editing.rules import Neuron, NeuronRule
from knlight.editing.scoring import Scorer
from knlight.lm import LanguageModel
from knlight.neurons.edits import NeuronEdit, direct_edit, scale_edit

__all__ = ["BASELINES", "baseline_edits", "computing_as", "direct_requests", "method_names", "score_methods"]


def method_names(mode: str, baselines: Sequence[str]) -> list[str]:
    """Methods evaluated side by side: ``unedited``, the edit (``edited`` or ``enhanced``), the baselines."""
    if mode == "enhance":
        return ["unedited", "enhanced", *(["enhanced_random"] if "random" in baselines else [])]
    return ["unedited", "edited", *[b for b in baselines if b != "random"]]


def direct_requests(plan: EditPlan, scorer: Scorer) -> list[tuple[list[Neuron], int, int]]:
    """``(neurons, new token, old token)`` per request and edit language: the first tokens of the new and old
    objects after the request's first edit query in that language (the input of ``direct_edit``)."""
    out = []
    for request in plan.requests:
        for lang in request.languages:
            rows = plan.edit_rows.get(request.group, [])
            query = next(r["query"] for r in rows if r["uuid"] == request.uuid and r["language"] == lang)
            new = scorer.encode(query, request.new[lang]).targets[0][1]
            old = scorer.encode(query, request.old[lang]).targets[0][1]
            out.append((request.neurons, new, old))
    return out


def baseline_edits(
    lm: LanguageModel,
    plan: EditPlan,
    *,
    mode: str,
    baselines: Sequence[str],
    rule: NeuronRule,
    scorer: Scorer,
    direct: DirectEdit,
    enhance_factor: float,
    model_name: str,
) -> dict[str, NeuronEdit]:
    """The training-free edits by method name (built on the model's device, not attached)."""
    methods: dict[str, NeuronEdit] = {}
    if mode == "enhance":
        union = sorted({n for ns in plan.enhance_neurons.values() for n in ns})
        methods["enhanced"] = scale_edit(lm, union, enhance_factor, {"model": model_name})
        if "random" in baselines:
            rand = sorted({n for u in plan.enhance_neurons for n in rule.neurons(u, "random")})
            methods["enhanced_random"] = scale_edit(lm, rand, enhance_factor)
        return methods
    union = sorted({n for r in plan.requests for n in r.neurons})
    for name in baselines:
        if name == "direct":
            methods[name] = direct_edit(
                lm,
                direct_requests(plan, scorer),
                direct.lambda_old,
                direct.lambda_new,
                embedding=direct.embedding,
                metadata={"model": model_name},
            )
        elif name in ("suppress", "enhance"):
            methods[name] = scale_edit(lm, union, 0.0 if name == "suppress" else 2.0)
    return methods


@contextmanager
def computing_as(
    name: str, lm: LanguageModel, edit: NeuronEdit | None, baselines: Mapping[str, NeuronEdit]
) -> Iterator[None]:
    """Context in which the model computes as method ``name``: ``unedited`` (the edit disabled), ``edited``
    (the edit as trained) or a training-free method of ``baselines`` (attached, with the edit disabled)."""
    with ExitStack() as stack:
        if edit is not None and name != "edited":
            stack.enter_context(edit.disabled())
        if name not in ("unedited", "edited"):
            stack.enter_context(baselines[name].applied(lm))
        yield


@torch.no_grad()
def score_methods(
    rows: Sequence[Mapping[str, Any]],
    methods: Sequence[str],
    lm: LanguageModel,
    edit: NeuronEdit | None,
    baselines: Callable[[], Mapping[str, NeuronEdit]],
    scorer: Scorer,
) -> Iterator[tuple[str, str, str, str, torch.Tensor]]:
    """``(method, role, measure, language, value)`` of every evaluation row under every method.

    Args:
        rows: Evaluation rows (see :mod:`knlight.editing.plan`).
        methods: The methods (:func:`method_names`; ``unedited`` among them: the other methods' reference).
        lm: The model, with ``edit`` attached (when there is one).
        edit: The trained or loaded edit.
        baselines: The training-free edits, asked for only when a method needs them.
        scorer: Scores the rows.
    """
    scores = {}
    for name in methods:
        with computing_as(name, lm, edit, {} if name in ("unedited", "edited") else baselines()):
            scores[name] = scorer.score(rows)
    for name, per_row in scores.items():
        for row, score, base in zip(rows, per_row, scores["unedited"]):
            for role, measure, value in row_measures(name, row["role"], score, base):
                yield name, role, measure, row["language"], value
