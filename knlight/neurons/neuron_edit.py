"""The :class:`NeuronEdit`: trainable deltas of chosen FFN neurons' weight slices, added by forward hooks.

The definition of an edit (which slices a neuron owns, how the hooks add the deltas) is in
:mod:`knlight.neurons.edits`; saving, loading and the base-weights check in :mod:`knlight.neurons.edit_files`.
Pure torch, no Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, cast

import torch
from torch import nn

from knlight.lm import LanguageModel
from knlight.lm.sites import in_neuron_axis, out_neuron_axis
from knlight.neurons.edit_files import NeuronEditFiles, Slice
from knlight.neurons.edit_layout import (
    EditLayout,
    Neuron,
    NeuronEditError,
    check_neurons,
    model_and_sites,
    model_layout,
)


def _param(module: nn.Module, name: str = "weight") -> nn.Parameter:
    return cast(nn.Parameter, getattr(module, name))


class NeuronEdit(NeuronEditFiles):
    """Trainable deltas for the weight slices of a set of FFN neurons, added in the forward pass.

    Build one with :meth:`for_model`, attach it with :meth:`apply`, train :meth:`parameters` (only the
    deltas), detach it with :meth:`remove`. Several edits may be applied to one model at once; their effects
    add. Files: :meth:`save`, :meth:`load` (see :mod:`knlight.neurons.edit_files`).

    Args:
        neurons: ``(layer, index)`` pairs (duplicates are dropped; stored sorted).
        layout: Sizes of the model the edit is for (see :func:`model_layout`).
        metadata: Provenance written into the saved file (model name, method, facts, ...).
        dtype: Dtype of the deltas (float32 by default, also for bf16 models: small updates need precision).

    Attributes:
        neurons: The sorted neurons.
        in_weight: ``[n_in, N, d_model]`` input-row deltas.
        in_bias: ``[n_in, N]`` input-bias deltas, or None when the input projections have no bias.
        out_weight: ``[N, d_model]`` output-column deltas.
        enabled: When False the hooks stay attached but add nothing (see :meth:`disabled`).
    """

    neuron_ids: torch.Tensor

    def __init__(
        self,
        neurons: Iterable[Neuron],
        layout: EditLayout,
        metadata: Mapping[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.neurons = sorted({(int(layer), int(index)) for layer, index in neurons})
        if not self.neurons:
            raise NeuronEditError("an edit needs at least one neuron; the neuron set is empty")
        check_neurons(self.neurons, layout.num_layers, layout.d_ff)
        self.layout = layout
        self.metadata = dict(metadata or {})
        n = len(self.neurons)
        self.register_buffer("neuron_ids", torch.tensor(self.neurons, dtype=torch.long), persistent=True)
        self.in_weight = nn.Parameter(torch.zeros(layout.n_in, n, layout.d_model, dtype=dtype))
        self.in_bias = nn.Parameter(torch.zeros(layout.n_in, n, dtype=dtype)) if layout.in_bias else None
        self.out_weight = nn.Parameter(torch.zeros(n, layout.d_model, dtype=dtype))
        # Neurons are sorted by layer: each layer owns one contiguous block of rows.
        self.blocks: dict[int, tuple[int, int]] = {}
        for row, (layer, _) in enumerate(self.neurons):
            start, _ = self.blocks.get(layer, (row, row))
            self.blocks[layer] = (start, row + 1)
        self.enabled = True
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._merged: list[tuple[nn.Parameter, int, torch.Tensor, torch.Tensor]] = []

    # ------------------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def for_model(
        cls,
        model: nn.Module | LanguageModel,
        neurons: Iterable[Neuron],
        metadata: Mapping[str, Any] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> NeuronEdit:
        """A zero edit of ``neurons`` for ``model`` (on the model's device).

        Raises:
            NeuronEditError: For a neuron outside the model or an empty set.
        """
        net, _ = model_and_sites(model)
        edit = cls(neurons, model_layout(model), metadata, dtype)
        name = edit.metadata.get("model")
        edit.metadata.setdefault(
            "base_model", edit.base_identity(model, name if isinstance(name, str) else None)
        )
        return edit.to(next(net.parameters()).device)

    @property
    def layers(self) -> list[int]:
        """The layers that hold edited neurons."""
        return sorted(self.blocks)

    def indices(self, layer: int) -> torch.Tensor:
        """Neuron indices (within the layer) of ``layer``'s block of rows."""
        start, end = self.blocks[layer]
        return self.neuron_ids[start:end, 1]

    def row_mask(self, neurons: Iterable[Neuron]) -> torch.Tensor:
        """``[N]`` bool: which rows of the deltas belong to ``neurons`` (e.g. to mask gradients)."""
        wanted = {(int(a), int(b)) for a, b in neurons}
        return torch.tensor([n in wanted for n in self.neurons], device=self.neuron_ids.device)

    # ------------------------------------------------------------------------------------------------------
    # attaching

    @property
    def attached(self) -> bool:
        """True while hooks are installed on a model."""
        return bool(self._handles)

    def apply(self, model: nn.Module | LanguageModel) -> NeuronEdit:  # type: ignore[override]
        """Attach the edit to ``model`` (forward hooks; the weights are not touched). Returns ``self``.

        Called with a plain function (``nn.Module.apply(fn)``, e.g. by a parent module) it does what
        ``nn.Module.apply`` does.

        Raises:
            NeuronEditError: When the model's layout differs from the edit's, or the edit is attached already.
        """
        if not isinstance(model, nn.Module | LanguageModel):
            return super().apply(model)
        if self._handles:
            raise NeuronEditError("this edit is attached already; call remove() first")
        _, sites = model_and_sites(model)
        self.check_layout(model_layout(model))
        for layer in self.layers:
            for j, proj in enumerate(sites.in_projs[layer]):
                self._handles.append(proj.register_forward_hook(self._in_hook(layer, j)))
            self._handles.append(sites.out_projs[layer].register_forward_hook(self._out_hook(layer)))
        return self

    def remove(self, model: nn.Module | LanguageModel | None = None) -> NeuronEdit:
        """Detach the edit: the model computes exactly what it did before :meth:`apply`. Returns ``self``."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return self

    @contextmanager
    def applied(self, model: nn.Module | LanguageModel) -> Iterator[NeuronEdit]:
        """Context manager: attached inside, detached after."""
        self.apply(model)
        try:
            yield self
        finally:
            self.remove()

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """Context manager: hooks stay attached but add nothing (the unedited model)."""
        before, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = before

    def _in_hook(self, layer: int, j: int) -> Any:
        start, end = self.blocks[layer]

        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            if not self.enabled:
                return None
            x = args[0]
            add = x @ self.in_weight[j, start:end].to(x.dtype).T
            if self.in_bias is not None:
                add = add + self.in_bias[j, start:end].to(x.dtype)
            return output.index_add(-1, self.neuron_ids[start:end, 1], add.to(output.dtype))

        return hook

    def _out_hook(self, layer: int) -> Any:
        start, end = self.blocks[layer]

        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            if not self.enabled:
                return None
            h = args[0].index_select(-1, self.neuron_ids[start:end, 1])
            return output + (h @ self.out_weight[start:end].to(h.dtype)).to(output.dtype)

        return hook

    # ------------------------------------------------------------------------------------------------------
    # merging into the weights

    def weight_slices(self, model: nn.Module | LanguageModel) -> Iterator[Slice]:
        """(base parameter, its neuron axis, neuron indices, delta laid out like the base slice) per slice."""
        _, sites = model_and_sites(model)
        in_axis, out_axis = in_neuron_axis(sites.spec.conv1d), out_neuron_axis(sites.spec.conv1d)
        for layer in self.layers:
            start, end = self.blocks[layer]
            idx = self.indices(layer)
            for j, proj in enumerate(sites.in_projs[layer]):
                delta = self.in_weight[j, start:end].detach()  # [k, d_model]
                yield _param(proj), in_axis, idx, delta.movedim(0, in_axis)
                if self.in_bias is not None:
                    yield _param(proj, "bias"), 0, idx, self.in_bias[j, start:end].detach()
            delta = self.out_weight[start:end].detach()  # [k, d_model]
            yield _param(sites.out_projs[layer]), out_axis, idx, delta.movedim(0, out_axis)

    @torch.no_grad()
    def merged_weights(self, model: nn.Module | LanguageModel) -> dict[str, torch.Tensor]:
        """The model's parameters with the edit baked in, as new tensors (the model is not changed).

        Every element outside the edited slices is a bitwise copy of the base weight.

        Returns:
            ``{parameter name: tensor}`` for every parameter of the model.
        """
        net, _ = model_and_sites(model)
        out = {name: p.detach().clone() for name, p in net.named_parameters()}
        name_of = {id(p): name for name, p in net.named_parameters()}
        for param, dim, idx, delta in self.weight_slices(model):
            name = name_of[id(param)]
            out[name] = out[name].index_add(dim, idx, delta.to(param.dtype))
        return out

    @torch.no_grad()
    def merge(self, model: nn.Module | LanguageModel) -> NeuronEdit:
        """Bake the edit into the model's weights and detach the hooks. Returns ``self``.

        The touched slices are copied first, so :meth:`unmerge` restores them bitwise.
        """
        if self._merged:
            raise NeuronEditError("this edit is merged already; call unmerge() first")
        self.remove()
        for param, dim, idx, delta in self.weight_slices(model):
            original = param.index_select(dim, idx).clone()
            param.index_copy_(dim, idx, original + delta.to(param.dtype))
            self._merged.append((param, dim, idx, original))
        return self

    @torch.no_grad()
    def unmerge(self) -> NeuronEdit:
        """Write back the exact original slices saved by :meth:`merge`. Returns ``self``."""
        for param, dim, idx, original in reversed(self._merged):
            param.index_copy_(dim, idx, original)
        self._merged.clear()
        return self

    def extra_repr(self) -> str:
        return f"neurons={len(self.neurons)}, layers={self.layers}, layout={self.layout}"
