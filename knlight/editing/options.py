"""The option blocks of an editing run (``model.init_args.requests``, ``.training``, ``.direct``) and the
checks of its other settings."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from knlight.editing.rules import parse_rule
from knlight.errors import ConfigError

MODES = ("edit", "inject", "enhance")
BASELINES = ("direct", "suppress", "enhance", "random")


def check_settings(
    mode: str, neuron_rule: str, baselines: Sequence[str], neurons: str | None, layers: Any
) -> None:
    """Check the settings of an editing run that are not option blocks (``model.init_args.<name>``).

    Raises:
        ConfigError: (or ``ValueError`` for the rule) naming the config key and the choices.
    """
    if mode not in MODES:
        raise ConfigError(f"model.init_args.mode={mode!r}: choose one of {', '.join(MODES)}")
    parse_rule(neuron_rule)
    unknown = sorted(set(baselines) - set(BASELINES))
    if unknown:
        raise ConfigError(f"model.init_args.baselines {unknown}: choose among {', '.join(BASELINES)}")
    if neurons is None and not (neuron_rule == "ffn" and layers):
        raise ConfigError(
            "model.init_args.neurons: give a neuron file (only neuron_rule=ffn with explicit layers needs none)"
        )


def _positive(block: str, **values: int | None) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ConfigError(f"model.init_args.{block}.{name}={value}: give a positive number")


@dataclass(frozen=True)
class EditRequests:
    """Which facts are edited, into what, and trained on which queries."""

    edits: list[dict[str, Any]] | str = "derive"
    """A list of ``{uuid, new_object, languages}`` (``new_object`` a string, a ``{language: string}`` map, or
    omitted for the fact's first wrong object), a JSONL file of them, or ``derive``: every fact of the
    datamodule's train split, new object = its first wrong object (``inject``: the train-split facts the model
    does not know, new object = the true one). A request may name its own ``languages``."""
    edit_languages: list[str] | None = None
    """Languages whose queries are trained on (default: ``en`` when the data has it, else its first language)."""
    edit_queries: int | None = 1
    """Rephrasings per edit language used for training (the first ones); the others measure same-language
    generality. None trains on all of them."""
    max_edits: int | None = None
    """At most this many requests (a seeded choice); None keeps all."""
    edits_per_group: int | None = None
    """None edits all facts at once (batched); k edits k facts at a time, one group after the other, each its
    own fine-tune (fresh optimizer state, only the group's neurons move), the deltas accumulating (sequential
    editing with k = 1)."""

    def __post_init__(self) -> None:
        _positive("requests", edit_queries=self.edit_queries, max_edits=self.max_edits,
                  edits_per_group=self.edits_per_group)  # fmt: skip


@dataclass(frozen=True)
class EditTraining:
    """How the neuron deltas are trained (the optimizer itself is ``model.init_args.optimizer``)."""

    steps: int = 30
    """Optimizer steps per group (one epoch is the whole schedule: use ``trainer.max_epochs: 1``)."""
    trainable: Literal["in_out", "out", "in"] = "in_out"
    """Which slices learn: ``in_out`` (W_in rows + bias and W_out columns), ``out`` (W_out columns only: the
    neurons keep firing where they fired, only what they write changes) or ``in``."""
    in_lr_scale: float = 0.1
    """Learning rate of the W_in slices relative to the optimizer's (a second param group). At 1.0 Adam tends to
    switch the old fact's neurons off (GELU/SiLU dead zone) before it rewrites what they write, and the edit
    gets stuck (measured on planted models); 0.1 avoids it."""
    locality_weight: float = 1.0
    """Weight of KL(edited ‖ unedited) on unrelated queries (0 disables it)."""

    def __post_init__(self) -> None:
        _positive("training", steps=self.steps)


@dataclass(frozen=True)
class DirectEdit:
    """Dai et al.'s training-free edit ``W_out[:, n] += λ2·E(new) − λ1·E(old)`` (baseline ``direct``)."""

    lambda_old: float = 1.0
    """λ1 (Dai et al.: 1)."""
    lambda_new: float = 8.0
    """λ2 (Dai et al.: 8)."""
    embedding: Literal["output", "input"] = "output"
    """Embedding rows the edit writes: ``output`` (unembedding: what the head reads) or ``input``."""
