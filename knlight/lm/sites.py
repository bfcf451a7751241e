"""Where the knowledge neurons are in each architecture (the adapter registry).

A knowledge neuron is coordinate ``i`` of the FFN activation ``h_l`` of layer ``l``: the *input* of the FFN output
projection (post-activation; for gated MLPs ``act(gate) * up``). This module maps a Hugging Face model onto that
definition: the transformer blocks, each block's output projection (whose input is ``h_l``), the input
projections whose rows belong to a neuron, the final norm and the LM head; and the layout of a neuron's weight
slices (:func:`neuron_rows`, :func:`neuron_columns`: ``nn.Linear`` vs GPT-2 ``Conv1D``). Pure torch, no Lightning.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from knlight.errors import KnlightError


@dataclass(frozen=True)
class ArchitectureSpec:
    """How to find the neuron sites of one model family.

    Attributes:
        model_types: ``config.model_type`` values this entry serves.
        masked: Masked LM (bidirectional, ``[MASK]`` targets) rather than causal LM.
        layers: Candidate dotted paths (from the top-level model) of the list of transformer blocks; the
            first that exists wins (model classes differ in their prefix).
        out_proj: Dotted path, inside a block, of the module whose input is ``h_l``.
        in_projs: Dotted paths, inside a block, of the modules whose output rows are the neurons (one for plain
            MLPs, gate and up for gated MLPs).
        final_norm: Candidate paths of the norm applied after the last block (None when the head has its own).
        head: Candidate paths of the LM head applied to the last hidden state.
        conv1d: Weights are GPT-2 ``Conv1D`` (``[in, out]``, transposed w.r.t. ``nn.Linear``).
    """

    model_types: tuple[str, ...]
    masked: bool
    layers: tuple[str, ...]
    out_proj: str
    in_projs: tuple[str, ...]
    final_norm: tuple[str, ...] = ()
    head: tuple[str, ...] = ("lm_head",)
    conv1d: bool = False


_GATED: dict = dict(
    masked=False,
    layers=("model.layers", "model.language_model.layers", "layers"),
    out_proj="mlp.down_proj",
    in_projs=("mlp.gate_proj", "mlp.up_proj"),
    final_norm=("model.norm", "model.language_model.norm", "norm"),
)

REGISTRY: list[ArchitectureSpec] = [
    ArchitectureSpec(
        model_types=("bert",),
        masked=True,
        layers=("bert.encoder.layer", "encoder.layer"),
        out_proj="output.dense",
        in_projs=("intermediate.dense",),
        head=("cls",),
    ),
    ArchitectureSpec(
        model_types=("xlm-roberta", "roberta", "camembert"),
        masked=True,
        layers=("roberta.encoder.layer", "encoder.layer"),
        out_proj="output.dense",
        in_projs=("intermediate.dense",),
        head=("lm_head",),
    ),
    ArchitectureSpec(
        model_types=("gpt2",),
        masked=False,
        layers=("transformer.h", "h"),
        out_proj="mlp.c_proj",
        in_projs=("mlp.c_fc",),
        final_norm=("transformer.ln_f", "ln_f"),
        conv1d=True,
    ),
    ArchitectureSpec(
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text"), **_GATED
    ),  # type: ignore[arg-type]
    ArchitectureSpec(
        model_types=("bloom",),
        masked=False,
        layers=("transformer.h", "h"),
        out_proj="mlp.dense_4h_to_h",
        in_projs=("mlp.dense_h_to_4h",),
        final_norm=("transformer.ln_f", "ln_f"),
    ),
]


class UnsupportedModelError(KnlightError, ValueError):
    """The model's architecture has no entry in :data:`REGISTRY`."""


def spec_for(model_type: str) -> ArchitectureSpec:
    """Return the registry entry for ``config.model_type``.

    Raises:
        UnsupportedModelError: naming the registry and how to add an entry.
    """
    for spec in REGISTRY:
        if model_type in spec.model_types:
            return spec
    known = sorted(t for spec in REGISTRY for t in spec.model_types)
    raise UnsupportedModelError(
        f"knlight does not know where the FFN neurons of model_type={model_type!r} are. Supported: "
        f"{', '.join(known)}. To add it, append an ArchitectureSpec to knlight.lm.sites.REGISTRY naming "
        "the block list, the FFN output projection (whose input is the neuron activation), the input "
        "projections, the final norm and the LM head."
    )


def get_path(root: nn.Module, path: str) -> nn.Module | None:
    """Follow a dotted attribute path; None when any step is missing."""
    module: object = root
    for name in path.split("."):
        if not hasattr(module, name):
            return None
        module = getattr(module, name)
    return module if isinstance(module, nn.Module) else None


def _first(root: nn.Module, paths: Sequence[str], what: str, model_type: str) -> nn.Module:
    for path in paths:
        module = get_path(root, path)
        if module is not None:
            return module
    raise UnsupportedModelError(
        f"{type(root).__name__} (model_type={model_type!r}) has none of the {what} paths {list(paths)}; load it "
        "with an LM-head class (AutoModelForMaskedLM / AutoModelForCausalLM) or extend "
        "knlight.lm.sites.REGISTRY."
    )


@dataclass
class NeuronSites:
    """The resolved neuron sites of one loaded model.

    Attributes:
        spec: The registry entry.
        blocks: Transformer blocks in order.
        out_projs: Per block, the module whose input is ``h_l``.
        in_projs: Per block, the modules whose output rows are the neurons.
        final_norm: Norm after the last block, or None.
        head: LM head on the last hidden state.
        logit_softcap: Gemma-style final logit soft-capping (None when absent).
    """

    spec: ArchitectureSpec
    blocks: list[nn.Module]
    out_projs: list[nn.Module]
    in_projs: list[list[nn.Module]]
    final_norm: nn.Module | None
    head: nn.Module
    logit_softcap: float | None = None
    d_ff: int = field(init=False)

    def __post_init__(self) -> None:
        weight: Any = self.out_projs[0].weight
        self.d_ff = int(weight.shape[0] if self.spec.conv1d else weight.shape[1])

    @property
    def num_layers(self) -> int:
        return len(self.blocks)


def resolve_sites(model: nn.Module) -> NeuronSites:
    """Find the neuron sites of a Hugging Face LM-head model."""
    config = model.config  # type: ignore[union-attr]
    model_type = str(getattr(config, "model_type", type(model).__name__))
    spec = spec_for(model_type)
    block_list = _first(model, spec.layers, "block-list", model_type)
    blocks = list(block_list)  # type: ignore[call-overload]
    out_projs = [_first(b, (spec.out_proj,), "FFN output projection", model_type) for b in blocks]
    in_projs = [[_first(b, (p,), "FFN input projection", model_type) for p in spec.in_projs] for b in blocks]
    final_norm = _first(model, spec.final_norm, "final norm", model_type) if spec.final_norm else None
    head = _first(model, spec.head, "LM head", model_type)
    softcap = getattr(config, "final_logit_softcapping", None)
    return NeuronSites(spec, blocks, out_projs, in_projs, final_norm, head, softcap)


# -- the weight slices of a neuron ----------------------------------------------------------------------------
# nn.Linear stores [out, in], GPT-2's Conv1D [in, out]; these functions are the one place that knows it.


def in_neuron_axis(conv1d: bool) -> int:
    """The axis of an FFN input projection's stored weight that indexes neurons (1 for ``Conv1D``, else 0).

    The bias of an input projection is indexed by neuron on its only axis.
    """
    return 1 if conv1d else 0


def out_neuron_axis(conv1d: bool) -> int:
    """The axis of the FFN output projection's stored weight that indexes neurons (0 for ``Conv1D``, else 1)."""
    return 0 if conv1d else 1


def neuron_rows(module: nn.Module, conv1d: bool) -> torch.Tensor:
    """A ``[d_ff, d_model]`` view of an FFN input projection's weight: row ``i`` is neuron ``i``'s input row.

    A view, not a copy: writing into it writes the weight.
    """
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    return weight.T if conv1d else weight


def neuron_columns(module: nn.Module, conv1d: bool) -> torch.Tensor:
    """A ``[d_model, d_ff]`` view of the FFN output projection's weight: column ``i`` is neuron ``i``'s output
    column (what ``h_l[i]`` is multiplied with).

    A view, not a copy: writing into it writes the weight.
    """
    weight: torch.Tensor = module.weight  # type: ignore[assignment]
    return weight.T if conv1d else weight
