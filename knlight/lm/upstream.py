"""The one place that knows how transformers calls its blocks: KV caches found by type, not by keyword name.

transformers renames keywords between minor releases (5.24 passes the decoder-layer cache as ``cache=``, 5.23
as ``past_key_values=``; BLOOM still says ``layer_past``). knlight therefore never looks a cache up by name:

* the cache parameter of a model's ``forward`` is the one annotated with :class:`transformers.Cache`
  (:func:`cache_parameter`);
* knlight passes a cache it created itself (:class:`RecordingCache`, a ``DynamicCache`` without config, so
  sliding-window layers keep every position) and finds it again in each block's recorded call by identity or
  type (:func:`is_cache`), whatever the keyword;
* the clean keys and values are read from what that cache's ``update`` returned (the documented protocol every
  attention layer calls), not from the cache's internal fields;
* a prefix cache for several rows is built through ``update`` as well (:func:`prefilled_cache`).

When a future signature cannot be handled, :class:`UpstreamError` names the block class, the installed
transformers version and the tested range, and says what to do. Pure torch + transformers, no Lightning.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

import torch
import transformers
from transformers import Cache, DynamicCache

from knlight.errors import KnlightError

TESTED_TRANSFORMERS = ">=5.23,<6"
"""The transformers range knlight is tested on (``pyproject.toml`` declares the same; a test checks it)."""


class UpstreamError(KnlightError, TypeError):
    """transformers called a block in a way knlight's fast paths do not understand (a newer or older API)."""


def upstream_error(block: object, problem: str) -> UpstreamError:
    """An :class:`UpstreamError` naming the block class, the installed version, the tested range and the fix."""
    name = block if isinstance(block, str) else type(block).__name__
    return UpstreamError(
        f"{name}: {problem} (transformers {transformers.__version__}; knlight is tested with transformers"
        f"{TESTED_TRANSFORMERS}). Use engine='reference' (same numbers, slower), or install a tested version: "
        f"pip install 'transformers{TESTED_TRANSFORMERS}'; please report it at knlight's issue tracker."
    )


def is_cache(value: object) -> bool:
    """True for a transformers KV cache object (the type, not the keyword it was passed under)."""
    return isinstance(value, Cache)


def _mentions_cache(annotation: Any) -> bool:
    if annotation is inspect.Parameter.empty:
        return False
    if isinstance(annotation, str):
        return "Cache" in annotation
    if isinstance(annotation, type):
        return issubclass(annotation, Cache)
    return any(_mentions_cache(arg) for arg in typing.get_args(annotation))


def cache_parameter(forward: Callable[..., Any]) -> str | None:
    """Name of the parameter of ``forward`` annotated with :class:`transformers.Cache` (None when there is none).

    Deprecated aliases (such as ``past_key_values`` in 5.24) are keyword-only shims of decorators and are not
    in the signature, so the current name wins.
    """
    for name, parameter in inspect.signature(forward).parameters.items():
        if _mentions_cache(parameter.annotation):
            return name
    return None


class RecordingCache(DynamicCache):
    """A ``DynamicCache`` that keeps every position of every layer and records what each layer's update returned.

    Built without a config, so sliding-window layers are not truncated (the fast engine needs the keys of every
    position). ``recorded[j]`` holds the ``(keys, values)`` of block ``j``: set :attr:`current_block` from a
    block pre-hook so the record is keyed by block order, not by the layer index transformers passes.
    """

    def __init__(self) -> None:
        super().__init__()
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.current_block: int | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        layer = self.current_block if self.current_block is not None else _layer_index(args, kwargs)
        self.recorded[layer] = (keys, values)
        return keys, values


def _layer_index(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    if args and isinstance(args[0], int):
        return args[0]
    if isinstance(kwargs.get("layer_idx"), int):
        return int(kwargs["layer_idx"])
    raise UpstreamError("a cache update came without a layer index and outside a recorded block")


class RowCache(DynamicCache):
    """A per-row cache for single-token rows: attention sees the given clean keys/values, then the row's own.

    Nothing is stored (every row is a one-step pass); ``get_seq_length`` reports the clean length.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.clean_keys, self.clean_values = keys, values

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.cat([self.clean_keys.to(key_states.dtype), key_states], dim=-2),
            torch.cat([self.clean_values.to(value_states.dtype), value_states], dim=-2),
        )

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:
        return int(self.clean_keys.shape[-2])


def prefilled_cache(
    recorded: dict[int, tuple[torch.Tensor, torch.Tensor]], repeats: int | torch.Tensor
) -> DynamicCache:
    """A fresh cache holding the recorded keys/values of every layer: each recorded row repeated ``repeats``
    times, or (a tensor) row ``repeats[r]`` of the recording as the cache's row r."""
    cache = DynamicCache()
    for layer in sorted(recorded):
        keys, values = recorded[layer]
        if isinstance(repeats, int):
            keys, values = keys.repeat_interleave(repeats, dim=0), values.repeat_interleave(repeats, dim=0)
        else:
            keys, values = keys[repeats.to(keys.device)], values[repeats.to(values.device)]
        cache.update(keys, values, layer)
    return cache


def takes_position_ids(model: Any) -> bool:
    """True when the base model's ``forward`` accepts explicit ``position_ids`` (a public keyword)."""
    return "position_ids" in inspect.signature(model.base_model.forward).parameters


def base_model_forward(model: Any, cache: Cache | None = None, **inputs: Any) -> Any:
    """``model.base_model(**inputs)`` with ``cache`` passed under the name the installed transformers uses.

    Raises:
        UpstreamError: When a cache is given but the base model's ``forward`` takes none.
    """
    base = model.base_model
    if cache is not None:
        name = cache_parameter(base.forward)
        if name is None:
            raise upstream_error(base, "its forward() has no parameter annotated as a transformers Cache")
        inputs = {**inputs, name: cache, "use_cache": True}
    return base(**inputs)


def last_hidden_state(output: Any) -> torch.Tensor:
    """The last hidden state of a base model's output (a ``ModelOutput``, a tuple, or any object with the field)."""
    value = getattr(output, "last_hidden_state", None)
    return value if isinstance(value, torch.Tensor) else output[0]
