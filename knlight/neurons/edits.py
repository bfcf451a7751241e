"""Neuron-restricted weight edits: trainable deltas for chosen FFN neurons beside frozen base weights.

A neuron ``(layer, index)`` owns three weight slices (see DESIGN.md, "The neuron"): its row of every FFN
input projection (``c_fc``; ``intermediate.dense``; ``gate_proj`` *and* ``up_proj``; ``dense_h_to_4h``), the
matching bias entry where a bias exists, and its column of the FFN output projection. A :class:`NeuronEdit`
holds one delta per slice as ``nn.Parameter`` and adds it **in the forward pass** through forward hooks:

* input projection ``j``: ``out[..., idx] += x @ ΔW_in[j]ᵀ + Δb[j]`` (identical to ``W_in[idx] += ΔW_in``);
* output projection: ``out += h[..., idx] @ ΔW_out`` (identical to ``W_out[:, idx] += ΔW_outᵀ``).

The base tensors are never written, so :meth:`NeuronEdit.remove` restores the model bitwise, an optimizer
given :meth:`NeuronEdit.parameters` can only move the deltas, and an edit is a small file
(:meth:`NeuronEdit.save`) that records the model it was made on (:meth:`NeuronEdit.base_identity`: a sketch
of the base weights at the edited neurons, checked by :meth:`NeuronEdit.load`). :meth:`NeuronEdit.merge` bakes
an edit into the weights (keeping exact copies of the touched slices, so :meth:`NeuronEdit.unmerge` restores
them bitwise too).

Layouts: ``nn.Linear`` weights are ``[out, in]``; GPT-2 ``Conv1D`` weights are ``[in, out]`` (handled here,
never by callers). Deltas are stored layout-free: ``in_weight[j, k]`` is neuron k's input row (length
``d_model``) of input projection j and ``out_weight[k]`` its output column (length ``d_model``).

Training-free edits are NeuronEdits too: :func:`direct_edit` (Dai et al.:
``W_out[:, n] += λ2·E(new) − λ1·E(old)``) and :func:`scale_edit` (``W_out[:, n] ·= factor``: 0 suppresses a
neuron at every position, 2 enhances it).

Pure torch, no Lightning.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from knlight.errors import KnlightError
from knlight.io import write_atomically
from knlight.lm import LanguageModel
from knlight.lm.sites import NeuronSites, resolve_sites

log = logging.getLogger(__name__)

Neuron = tuple[int, int]

FORMAT = "knlight.neuron_edit/1"
"""``format`` metadata value of a saved edit."""


class NeuronEditError(KnlightError, ValueError):
    """An edit that does not fit a model (neuron out of range, other sizes or weights, unsupported layout), or
    an edit file that cannot be read."""


SKETCH_SIZE = 8
"""Numbers in the sketch of an edit's base weights (see :meth:`NeuronEdit.base_identity`)."""
_SKETCH_VALUES = 1 << 16  # at most this many base values enter the sketch (evenly spaced)
_SKETCH_TOLERANCE = 0.05  # per sketch number; the same weights in another dtype differ by ~0.005 (bf16)
_NORM_TOLERANCE = 0.02  # relative
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19)


@dataclass(frozen=True)
class EditLayout:
    """The sizes an edit depends on; an edit only applies to a model with the same layout.

    Attributes:
        model_type: ``config.model_type``.
        num_layers: Transformer blocks.
        d_ff: FFN width (neurons per layer).
        d_model: Hidden size (length of a neuron's input row and output column).
        n_in: Input projections per layer (2 for gated MLPs: gate and up).
        in_bias: The input projections have a bias.
    """

    model_type: str
    num_layers: int
    d_ff: int
    d_model: int
    n_in: int
    in_bias: bool


def _param(module: nn.Module, name: str = "weight") -> nn.Parameter:
    return cast(nn.Parameter, getattr(module, name))


def _sites_of(model: nn.Module | LanguageModel) -> tuple[nn.Module, NeuronSites]:
    if isinstance(model, LanguageModel):
        return model.model, model.sites
    return model, resolve_sites(model)


def model_layout(model: nn.Module | LanguageModel) -> EditLayout:
    """Read the :class:`EditLayout` of a Hugging Face LM-head model (or a :class:`~knlight.LanguageModel`).

    Raises:
        NeuronEditError: For a layout the hooks cannot serve (Bloom's tensor-parallel ``slow_but_exact`` path,
            input projections of mixed bias).
    """
    net, sites = _sites_of(model)
    config = getattr(net, "config", None)
    if getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False):
        raise NeuronEditError(
            "Bloom with pretraining_tp > 1 and slow_but_exact=True calls F.linear on weight slices, "
            "bypassing the FFN output projection's forward; set config.slow_but_exact = False."
        )
    conv1d = sites.spec.conv1d
    in_projs = sites.in_projs[0]
    biases = {getattr(p, "bias", None) is not None for p in in_projs}
    if len(biases) != 1:
        raise NeuronEditError(f"input projections {in_projs} mix biased and bias-free layers; not supported")
    out_weight = _param(sites.out_projs[0])
    return EditLayout(
        model_type=str(getattr(config, "model_type", type(net).__name__)),
        num_layers=sites.num_layers,
        d_ff=sites.d_ff,
        d_model=int(out_weight.shape[1] if conv1d else out_weight.shape[0]),
        n_in=len(in_projs),
        in_bias=biases.pop(),
    )


def check_neurons(neurons: Iterable[Neuron], num_layers: int, d_ff: int, source: str = "neuron set") -> None:
    """Raise :class:`NeuronEditError` naming the first neuron outside a model of the given size."""
    for layer, index in neurons:
        if not (0 <= int(layer) < num_layers and 0 <= int(index) < d_ff):
            raise NeuronEditError(
                f"{source}: neuron (layer={layer}, index={index}) is outside this model ({num_layers} "
                f"layers × {d_ff} neurons); was it selected on another model?"
            )


class NeuronEdit(nn.Module):
    """Trainable deltas for the weight slices of a set of FFN neurons, added in the forward pass.

    Build one with :meth:`for_model`, attach it with :meth:`apply`, train :meth:`parameters` (only the
    deltas), detach it with :meth:`remove`. Several edits may be applied to one model at once; their effects
    add.

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
        self.neurons: list[Neuron] = sorted({(int(layer), int(index)) for layer, index in neurons})
        if not self.neurons:
            raise NeuronEditError("an edit needs at least one neuron; the neuron set is empty")
        check_neurons(self.neurons, layout.num_layers, layout.d_ff)
        self.layout = layout
        self.metadata: dict[str, Any] = dict(metadata or {})
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
        net, _ = _sites_of(model)
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
        _, sites = _sites_of(model)
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

    def _slices(
        self, model: nn.Module | LanguageModel
    ) -> Iterator[tuple[nn.Parameter, int, torch.Tensor, torch.Tensor]]:
        """(base parameter, dim of the neuron axis, neuron indices, delta laid out like the base slice)."""
        _, sites = _sites_of(model)
        conv1d = sites.spec.conv1d
        for layer in self.layers:
            start, end = self.blocks[layer]
            idx = self.indices(layer)
            for j, proj in enumerate(sites.in_projs[layer]):
                delta = self.in_weight[j, start:end].detach()  # [k, d_model]
                # Linear [d_ff, d_model]: neuron rows (dim 0); Conv1D [d_model, d_ff]: neuron columns (dim 1).
                yield _param(proj), (1 if conv1d else 0), idx, (delta.T if conv1d else delta)
                if self.in_bias is not None:
                    yield _param(proj, "bias"), 0, idx, self.in_bias[j, start:end].detach()
            out = sites.out_projs[layer]
            delta = self.out_weight[start:end].detach()  # [k, d_model]
            # Linear [d_model, d_ff]: neuron columns (dim 1); Conv1D [d_ff, d_model]: neuron rows (dim 0).
            yield _param(out), (0 if conv1d else 1), idx, (delta if conv1d else delta.T)

    @torch.no_grad()
    def merged_weights(self, model: nn.Module | LanguageModel) -> dict[str, torch.Tensor]:
        """The model's parameters with the edit baked in, as new tensors (the model is not changed).

        Every element outside the edited slices is a bitwise copy of the base weight.

        Returns:
            ``{parameter name: tensor}`` for every parameter of the model.
        """
        net, _ = _sites_of(model)
        out = {name: p.detach().clone() for name, p in net.named_parameters()}
        name_of = {id(p): name for name, p in net.named_parameters()}
        for param, dim, idx, delta in self._slices(model):
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
        for param, dim, idx, delta in self._slices(model):
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

    # ------------------------------------------------------------------------------------------------------
    # the model an edit was made on

    @torch.no_grad()
    def base_identity(self, model: nn.Module | LanguageModel, name: str | None = None) -> dict[str, Any]:
        """What identifies the base weights this edit acts on: a sketch of them at the edited neurons.

        The deltas were trained against these weights; on another model of the same shape they do something
        else. The sketch is ``SKETCH_SIZE`` fixed projections of (up to 65536 evenly spaced) base values of the
        edited slices, normalised by their norm: the same weights in another dtype give the same sketch to
        ~0.005, other weights an unrelated one (each number ~N(0, 1)). Cheap: it reads only those slices.

        Args:
            model: The model (its weights are read, never written).
            name: The model's name (e.g. ``tiny:gpt2``, a hub id); default: its config's ``_name_or_path``.

        Returns:
            ``{"name", "dtype", "values", "norm", "sketch"}``.
        """
        net, _ = _sites_of(model)
        if name is None:
            name = str(getattr(getattr(net, "config", None), "_name_or_path", "") or type(net).__name__)
        parts = [param.detach().index_select(dim, idx).movedim(dim, 0).reshape(-1)
                 for param, dim, idx, _ in self._slices(model)]  # fmt: skip
        values = torch.cat(parts).to("cpu", torch.float64)
        if values.numel() > _SKETCH_VALUES:
            values = values[torch.linspace(0, values.numel() - 1, _SKETCH_VALUES).round().long()]
        norm = float(values.norm())
        position = torch.arange(values.numel(), dtype=torch.float64)
        sketch = []
        for prime in _PRIMES[:SKETCH_SIZE]:
            # cos(2π·frac(i·α)) with irrational α = frac(√prime): a fixed pattern of mean square 1/2
            direction = torch.cos(2 * math.pi * torch.frac(position * (math.sqrt(prime) % 1.0)))
            sketch.append(
                round(float((direction * values).sum()) * math.sqrt(2.0) / norm, 6) if norm else 0.0
            )
        dtype = str(parts[0].dtype).removeprefix("torch.") if parts else "unknown"
        return {"name": name, "dtype": dtype, "values": int(values.numel()), "norm": norm, "sketch": sketch}

    def check_base(
        self,
        model: nn.Module | LanguageModel,
        name: str | None = None,
        source: str = "edit",
        allow_other_model: bool = False,
    ) -> None:
        """Refuse to act on other base weights than the edit was made on (see :meth:`base_identity`).

        Args:
            model: The model the edit is about to be applied to.
            name: Its name, for the message.
            source: The edit, for the message (its file).
            allow_other_model: Warn instead of raising.

        Raises:
            NeuronEditError: When the base weights at the edited neurons differ (another model of the same
                shape, e.g. another seed or checkpoint).
        """
        made_on = self.metadata.get("base_model")
        current = self.base_identity(model, name)
        if not isinstance(made_on, dict) or not isinstance(made_on.get("sketch"), list):
            log.warning(
                "%s does not record the model it was made on (written by an older knlight?); cannot check that "
                "it fits %s",
                source,
                current["name"],
            )
            return
        if _same_weights(made_on, current):
            if made_on.get("name") != current["name"]:
                log.info(
                    "%s was made on %s: the same weights as %s", source, made_on.get("name"), current["name"]
                )
            return
        message = (
            f"{source} was made on model {made_on.get('name')!r}, but this model ({current['name']!r}) has other "
            "base weights at the edited neurons (same shape, other model, seed or checkpoint): the deltas were "
            f"trained against {made_on.get('name')!r} and do not do here what was measured there. Apply it to "
            f"{made_on.get('name')!r}, or force it with allow_other_model=True (config: "
            "model.init_args.allow_other_model: true)"
        )
        if not allow_other_model:
            raise NeuronEditError(message)
        log.warning("%s; applying it anyway (allow_other_model)", message.split(": the deltas")[0])

    # ------------------------------------------------------------------------------------------------------
    # files

    def check_layout(self, layout: EditLayout, source: str = "edit") -> None:
        """Raise :class:`NeuronEditError` naming every size in which ``layout`` differs from the edit's."""
        mine, theirs = asdict(self.layout), asdict(layout)
        diff = [
            f"{k}: edit {mine[k]!r} vs model {theirs[k]!r}"
            for k in mine
            if k != "model_type" and mine[k] != theirs[k]
        ]
        if diff:
            raise NeuronEditError(f"{source} does not fit this model ({'; '.join(diff)})")
        if mine["model_type"] != theirs["model_type"]:
            log.warning(
                "%s was made for model_type %s, applying it to %s",
                source,
                mine["model_type"],
                theirs["model_type"],
            )

    def tensors(self) -> dict[str, torch.Tensor]:
        """The edit as named CPU tensors (what :meth:`save` writes)."""
        out = {
            "neurons": self.neuron_ids.detach().cpu().contiguous(),
            "in_weight": self.in_weight.detach().cpu().contiguous(),
            "out_weight": self.out_weight.detach().cpu().contiguous(),
        }
        if self.in_bias is not None:
            out["in_bias"] = self.in_bias.detach().cpu().contiguous()
        return out

    def save(self, path: str | Path, **metadata: Any) -> Path:
        """Write the edit as a safetensors file: neuron ids, deltas and provenance metadata.

        Metadata (strings; JSON where structured): ``format``, the :class:`EditLayout` fields, ``layers``,
        ``date`` (UTC, ISO 8601) and everything in :attr:`metadata` and ``metadata`` (e.g. ``model``,
        ``method``, ``facts``, ``base_model``). Written atomically: a crash never leaves a truncated file (a
        temporary file in the same folder, flushed to disk, then renamed over ``path``).

        Returns:
            The path written.

        Raises:
            OSError: The file could not be written (e.g. a full disk); ``path`` is as it was.
        """
        from safetensors import SafetensorError
        from safetensors.torch import save_file

        path = Path(path)
        info: dict[str, Any] = {
            **self.metadata,
            **metadata,
            **asdict(self.layout),
            "format": FORMAT,
            "layers": self.layers,
            "num_neurons": len(self.neurons),
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        }
        strings = {k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in info.items()}
        tensors = self.tensors()
        try:
            write_atomically(path, lambda target: save_file(tensors, target, metadata=strings))
        except SafetensorError as error:  # e.g. a full disk, reported by safetensors' own writer
            raise OSError(
                f"{path}: could not write the edit ({error}); the previous file is untouched"
            ) from None
        return path

    @classmethod
    def load(
        cls,
        path: str | Path,
        model: nn.Module | LanguageModel | None = None,
        *,
        model_name: str | None = None,
        allow_other_model: bool = False,
    ) -> NeuronEdit:
        """Read an edit written by :meth:`save`, validating it against ``model`` when given.

        Args:
            path: The ``.safetensors`` file.
            model: Check that the edit fits this model: sizes, neurons and the base weights it was made on
                (:meth:`check_base`); the edit is moved to its device.
            model_name: The model's name, for messages.
            allow_other_model: Only warn when the edit was made on other base weights.

        Raises:
            NeuronEditError: Missing, truncated or corrupt file, not a knlight edit, inconsistent tensors, or
                (with ``model``) a neuron outside the model, other sizes (d_ff, d_model, layers, input
                projections) or other base weights.
        """
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise NeuronEditError(
                f"{path}: no such edit file; write one with NeuronEdit.save or `knlight fit`"
            )
        try:
            with safe_open(str(path), framework="pt") as f:
                raw = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a Mapping)
        except (SafetensorError, OSError, RuntimeError, ValueError) as error:
            raise NeuronEditError(
                f"{path}: not a readable safetensors file ({type(error).__name__}: {error}); it is truncated or "
                "corrupt (an interrupted copy?): copy it again, or re-create it with `knlight fit`"
            ) from None
        if raw.get("format") != FORMAT:
            raise NeuronEditError(
                f"{path}: not a knlight neuron edit (format {raw.get('format')!r}, want {FORMAT!r})"
            )
        meta = {k: _maybe_json(v) for k, v in raw.items()}
        missing = [k for k in EditLayout.__dataclass_fields__ if k not in meta]
        missing += [k for k in ("neurons", "in_weight", "out_weight") if k not in tensors]
        if missing:
            raise NeuronEditError(
                f"{path}: a knlight edit without {', '.join(missing)}; re-create it with `knlight fit`"
            )
        layout = EditLayout(**{k: meta[k] for k in EditLayout.__dataclass_fields__})
        neurons = [tuple(n) for n in tensors["neurons"].tolist()]
        check_neurons(neurons, layout.num_layers, layout.d_ff, source=str(path))
        provenance = {k: v for k, v in meta.items() if k not in EditLayout.__dataclass_fields__}
        edit = cls(neurons, layout, provenance, dtype=tensors["out_weight"].dtype)
        expected = {k: tuple(v.shape) for k, v in edit.tensors().items()}
        found = {k: tuple(v.shape) for k, v in tensors.items()}
        if expected != found or edit.neurons != neurons:
            raise NeuronEditError(
                f"{path}: tensor shapes {found} do not match its metadata (expected {expected})"
            )
        with torch.no_grad():
            edit.in_weight.copy_(tensors["in_weight"])
            edit.out_weight.copy_(tensors["out_weight"])
            if edit.in_bias is not None:
                edit.in_bias.copy_(tensors["in_bias"])
        if model is not None:
            actual = model_layout(model)
            check_neurons(neurons, actual.num_layers, actual.d_ff, source=str(path))
            edit.check_layout(actual, source=str(path))
            edit.check_base(model, model_name, str(path), allow_other_model)
            net, _ = _sites_of(model)
            edit = edit.to(next(net.parameters()).device)
        return edit

    def extra_repr(self) -> str:
        return f"neurons={len(self.neurons)}, layers={self.layers}, layout={self.layout}"


def _same_weights(made_on: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Two :meth:`NeuronEdit.base_identity` records describe the same weights (to dtype rounding)."""
    sketch_a, sketch_b = made_on.get("sketch") or [], current.get("sketch") or []
    norm_a, norm_b = float(made_on.get("norm") or 0.0), float(current.get("norm") or 0.0)
    return (
        made_on.get("values") == current.get("values")
        and len(sketch_a) == len(sketch_b)
        and abs(norm_a - norm_b) <= _NORM_TOLERANCE * max(norm_a, norm_b)
        and all(abs(float(a) - float(b)) <= _SKETCH_TOLERANCE for a, b in zip(sketch_a, sketch_b))
    )


def _maybe_json(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


# ----------------------------------------------------------------------------------------------------------
# training-free edits


def output_columns(model: nn.Module | LanguageModel, neurons: Sequence[Neuron]) -> torch.Tensor:
    """``[len(neurons), d_model]``: each neuron's current column of its layer's FFN output projection."""
    _, sites = _sites_of(model)
    cols = []
    for layer, index in neurons:
        weight = _param(sites.out_projs[layer])
        cols.append(weight[index] if sites.spec.conv1d else weight[:, index])
    return torch.stack(cols).detach()


def scale_edit(
    model: nn.Module | LanguageModel,
    neurons: Iterable[Neuron],
    factor: float,
    metadata: Mapping[str, Any] | None = None,
) -> NeuronEdit:
    """Scale neurons' output columns: ``W_out[:, n] ·= factor`` at every position (0 suppresses, 2 enhances).

    Equivalent to multiplying the activation ``h_n`` by ``factor`` everywhere (W_out is linear in h).
    """
    edit = NeuronEdit.for_model(model, neurons, {"method": f"scale×{factor:g}", **(metadata or {})})
    with torch.no_grad():
        edit.out_weight.copy_((factor - 1.0) * output_columns(model, edit.neurons).to(edit.out_weight.dtype))
    return edit


def token_embeddings(model: nn.Module | LanguageModel, which: str = "output") -> torch.Tensor:
    """``[vocab, d_model]``: the output (unembedding) or input embedding matrix."""
    net, _ = _sites_of(model)
    if which not in ("output", "input"):
        raise ValueError(f"embedding {which!r}: choose 'output' (unembedding) or 'input' (token embedding)")
    module = net.get_output_embeddings() if which == "output" else net.get_input_embeddings()  # type: ignore[operator]
    if module is None:
        raise NeuronEditError(f"{type(net).__name__} has no {which} embeddings")
    return module.weight.detach()


def direct_edit(
    model: nn.Module | LanguageModel,
    requests: Sequence[tuple[Sequence[Neuron], int, int]],
    lambda_old: float = 1.0,
    lambda_new: float = 8.0,
    embedding: str = "output",
    metadata: Mapping[str, Any] | None = None,
) -> NeuronEdit:
    """Dai et al.'s training-free fact update as a :class:`NeuronEdit`.

    For each request ``(neurons, new_token, old_token)``: ``W_out[:, n] += λ_new·E(new) − λ_old·E(old)`` for
    every neuron n of the request (E = embedding row of the object's first token). Neurons shared by several
    requests receive the sum. Dai et al. used λ_old = 1, λ_new = 8 and BERT's (tied) word embeddings.

    Args:
        model: The model (its embeddings are read, never written).
        requests: Per fact, its neurons and the first token ids of the new and the old object.
        lambda_old: λ1, weight of the removed old-object direction.
        lambda_new: λ2, weight of the added new-object direction.
        embedding: ``output`` (unembedding rows: what the head reads) or ``input`` (token embeddings).
        metadata: Provenance for :meth:`NeuronEdit.save`.
    """
    neurons = {n for ns, _, _ in requests for n in ns}
    edit = NeuronEdit.for_model(
        model,
        neurons,
        {"method": "direct", "lambda_old": lambda_old, "lambda_new": lambda_new, "embedding": embedding,
         **(metadata or {})},
    )  # fmt: skip
    table = token_embeddings(model, embedding)
    row = {n: k for k, n in enumerate(edit.neurons)}
    with torch.no_grad():
        for ns, new, old in requests:
            direction = (lambda_new * table[new] - lambda_old * table[old]).to(edit.out_weight.dtype)
            for n in ns:
                edit.out_weight[row[(int(n[0]), int(n[1]))]] += direction
    return edit
