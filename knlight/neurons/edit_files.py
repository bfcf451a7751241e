"""The file half of a :class:`~knlight.neurons.edits.NeuronEdit`: the edit file format and the base-weights check.

An edit file is a safetensors file: tensors ``neurons`` ``[N, 2]``, ``in_weight`` ``[n_in, N, d_model]``,
``out_weight`` ``[N, d_model]`` (and ``in_bias`` ``[n_in, N]`` when the input projections have a bias), and string
metadata (JSON where structured): ``format`` (:data:`FORMAT`), the :class:`~knlight.neurons.edit_layout.EditLayout`
fields, ``layers``, ``num_neurons``, ``date`` and the edit's provenance, among it ``base_model`` (see
:meth:`NeuronEditFiles.base_identity`). Pure torch, no Lightning.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any, Self

import torch
from torch import nn

from knlight.io import write_atomically
from knlight.lm import LanguageModel
from knlight.neurons.edit_layout import (
    EditLayout,
    Neuron,
    NeuronEditError,
    check_neurons,
    model_and_sites,
    model_layout,
)

# The edits' one logger (its messages are about edits, whichever module of them writes them).
log = logging.getLogger("knlight.neurons.edits")

FORMAT = "knlight.neuron_edit/1"
"""``format`` metadata value of a saved edit."""

SKETCH_SIZE = 8
"""Numbers in the sketch of an edit's base weights (see :meth:`NeuronEditFiles.base_identity`)."""
_SKETCH_VALUES = 1 << 16  # at most this many base values enter the sketch (evenly spaced)
_SKETCH_TOLERANCE = 0.05  # per sketch number; the same weights in another dtype differ by ~0.005 (bf16)
_NORM_TOLERANCE = 0.02  # relative
_PRIMES = (2, 3, 5, 7, 11, 13, 17, 19)

Slice = tuple[nn.Parameter, int, torch.Tensor, torch.Tensor]
"""(base parameter, its neuron axis, neuron indices, delta laid out like the base slice)."""


def evenly_spaced(n: int, k: int) -> torch.Tensor:
    """``k`` evenly spaced indices into ``n`` items, first and last included (float64: in float32 the last
    index of a large ``n``, e.g. a whole-FFN edit of a 135M model, rounds up past the end)."""
    return torch.linspace(0, n - 1, k, dtype=torch.float64).round().long()


class NeuronEditFiles(nn.Module):
    """Saving, loading and the base-weights identity of an edit; :class:`~knlight.neurons.edits.NeuronEdit`
    inherits them (the deltas and hooks live there)."""

    neurons: list[Neuron]
    layout: EditLayout
    metadata: dict[str, Any]
    neuron_ids: torch.Tensor
    in_weight: nn.Parameter
    in_bias: nn.Parameter | None
    out_weight: nn.Parameter

    @property
    def layers(self) -> list[int]:
        """The layers that hold edited neurons."""
        raise NotImplementedError

    def weight_slices(self, model: nn.Module | LanguageModel) -> Iterator[Slice]:
        """The base weight slices the edit acts on, with its deltas (see :data:`Slice`)."""
        raise NotImplementedError

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
        net, _ = model_and_sites(model)
        if name is None:
            name = str(getattr(getattr(net, "config", None), "_name_or_path", "") or type(net).__name__)
        parts = [param.detach().index_select(dim, idx).movedim(dim, 0).reshape(-1)
                 for param, dim, idx, _ in self.weight_slices(model)]  # fmt: skip
        values = torch.cat(parts).to("cpu", torch.float64)
        if values.numel() > _SKETCH_VALUES:
            values = values[evenly_spaced(values.numel(), _SKETCH_VALUES)]
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
    ) -> Self:
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
        path = Path(path)
        layout, neurons, provenance, tensors = _read_edit_file(path)
        # NeuronEdit's constructor (this base class leaves construction to it).
        edit: Self = cls(neurons, layout, provenance, dtype=tensors["out_weight"].dtype)  # type: ignore[call-arg]
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
            net, _ = model_and_sites(model)
            edit = edit.to(next(net.parameters()).device)
        return edit


def _read_edit_file(
    path: Path,
) -> tuple[EditLayout, list[Neuron], dict[str, Any], dict[str, torch.Tensor]]:
    """The layout, neurons, provenance and tensors of an edit file (format and keys checked)."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise NeuronEditError(f"{path}: no such edit file; write one with NeuronEdit.save or `knlight fit`")
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
    neurons: list[Neuron] = [(int(a), int(b)) for a, b in tensors["neurons"].tolist()]
    check_neurons(neurons, layout.num_layers, layout.d_ff, source=str(path))
    provenance = {k: v for k, v in meta.items() if k not in EditLayout.__dataclass_fields__}
    return layout, neurons, provenance, tensors


def _same_weights(made_on: Mapping[str, Any], current: Mapping[str, Any]) -> bool:
    """Two :meth:`NeuronEditFiles.base_identity` records describe the same weights (to dtype rounding)."""
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
