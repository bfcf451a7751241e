"""The measures an editing evaluation row contributes (see :mod:`knlight.metrics.editing` for the names).

A row is one query of one role; a method (``unedited``, ``edited``, a training-free baseline) scores it as a
:class:`RowScore`. Definitions:

* ``top1``: the first answer token is the argmax at the first answer position;
* ``rank``: the target's log-probability beats every competitor's (editing: the old object; injection and
  enhancement: the wrong objects);
* ``p_new`` / ``p_old``: P(target) and P(first competitor) (edit roles);
* locality: ``top1`` = the argmax at the answer position is the unedited model's, ``kl`` = KL(method ‖
  unedited) of the next-token distribution there (both only for methods that change the model);
* enhancement (role ``facts``): ``fixed`` is 1 when the query was wrong before (unedited ``rank`` = 0) and is
  right after, 0 when it stays wrong; ``broken`` is 1 when it was right before and is wrong after, 0 when it
  stays right. Their means are "share of the wrong queries fixed" and "share of the right queries broken".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypedDict

import torch

from knlight.metrics.editing import metric_name

GENERALITY_ROLES = ("generality_lang", "generality_cross")
EDIT_ROLES = ("reliability", *GENERALITY_ROLES)
EDIT_MEASURES = ("top1", "rank", "p_new", "p_old")


class RowScore(TypedDict):
    """What a method gives one row.

    Attributes:
        lp_target: log P(target) (sum over its tokens, gold prefix teacher-forced), a scalar tensor.
        first: ``[vocab]`` log-probabilities at the first answer position.
        first_token: The target's first token id.
        lp_comp: log P of each competitor (same query), scalar tensors.
    """

    lp_target: torch.Tensor
    first: torch.Tensor
    first_token: int
    lp_comp: list[torch.Tensor]


def _beats(score: RowScore) -> bool | None:
    if not score["lp_comp"]:
        return None
    return bool(score["lp_target"] > max(score["lp_comp"]))


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) of two log-probability vectors (>= 0 up to rounding; clamped at 0)."""
    return (log_p.exp() * (log_p - log_q)).sum().clamp_min(0.0)


def row_measures(
    method: str, role: str, score: RowScore, base: RowScore
) -> list[tuple[str, str, torch.Tensor]]:
    """``(role, measure, value)`` triples one row adds under ``method`` (``base``: the unedited score).

    Generality rows also count under ``generality`` (both kinds together).
    """
    top1 = torch.tensor(float(int(score["first"].argmax()) == score["first_token"]))
    right = _beats(score)
    if role == "locality":
        if method == "unedited":
            return []
        same = float(int(score["first"].argmax()) == int(base["first"].argmax()))
        return [
            (role, "top1", torch.tensor(same)),
            (role, "kl", kl_divergence(score["first"], base["first"])),
        ]
    if role == "facts":
        out = [(role, "top1", top1)]
        if right is not None:
            out.append((role, "rank", torch.tensor(float(right))))
            if method != "unedited":
                before = _beats(base)
                if before:
                    out.append((role, "broken", torch.tensor(float(not right))))
                else:
                    out.append((role, "fixed", torch.tensor(float(right))))
        return out
    out = []
    for r in (role, "generality") if role in GENERALITY_ROLES else (role,):
        out += [(r, "top1", top1), (r, "p_new", score["lp_target"].exp())]
        if right is not None:
            out += [(r, "rank", torch.tensor(float(right))), (r, "p_old", score["lp_comp"][0].exp())]
    return out


def metric_names(rows: Sequence[Mapping[str, Any]], methods: Sequence[str]) -> list[str]:
    """Every metric name the evaluation rows can add under the methods (what :func:`row_measures` may return,
    declared up front so that every process holds the same metrics)."""
    names = []
    for row in rows:
        role, lang = row["role"], row["language"]
        for method in methods:
            if role == "facts":
                measures = ("top1", "rank") if method == "unedited" else ("top1", "rank", "fixed", "broken")
                names += [metric_name(method, role, m, lang) for m in measures]
            elif role == "locality":
                if method != "unedited":
                    names += [metric_name(method, role, m, lang) for m in ("top1", "kl")]
            else:
                for r in (role, "generality") if role.startswith("generality") else (role,):
                    names += [metric_name(method, r, m, lang) for m in EDIT_MEASURES]
    return names


HEADLINE = (("reliability", "rank"), ("generality_cross", "rank"), ("locality", "top1"), ("facts", "rank"))
"""The ``(role, measure)`` pairs a run logs per method when it ends."""


def headline(values: Mapping[str, tuple[float, int]], method: str) -> str:
    """``reliability/rank=0.950, ...``: the method's :data:`HEADLINE` means over all languages (those it has)."""
    shown = [(f"{r}/{m}", values.get(metric_name(method, r, m, "all"))) for r, m in HEADLINE]
    return ", ".join(f"{m}={v[0]:.3f}" for m, v in shown if v and v[1])
