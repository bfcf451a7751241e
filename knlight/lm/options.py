"""The language-model options every task takes (one block in every config: ``model.init_args.lm``)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from knlight.lm.model import LanguageModel


@dataclass(frozen=True)
class LMOptions:
    """The language model a task works on.

    Parsing a config never loads weights: :meth:`kind` and :meth:`dims` read the model's config only.
    """

    model: str
    """Hub id (``bert-base-multilingual-cased``, ``ai-forever/mGPT``, ...; elsewhere: there is no hub here),
    local folder or ``.gguf`` file, a packaged model (``gemma3-270m``, ``smollm2-135m``) or ``tiny:<arch>[:seed]``
    (a tiny random model for tests and demos)."""
    tokenizer: str | None = None
    """Where to load the tokenizer from (default: the model's)."""
    dtype: str | None = None
    """Weight and compute dtype: ``float32`` (default), ``bf16``, ``fp16`` or ``float64``."""
    gguf_file: str | None = None
    """GGUF file name inside ``model`` (a ``model`` path ending in ``.gguf`` sets it too)."""

    def kind(self) -> str:
        """``"masked"`` or ``"causal"``, from the model's config (no weights are loaded)."""
        return model_kind(self.model, self.gguf_file)

    def dims(self) -> tuple[int, int]:
        """``(num_layers, d_ff)`` from the model's config (tiny models are built, others sized on ``meta``)."""
        return model_dims(self.model, self.gguf_file)

    def load(self, device: Any = None) -> LanguageModel:
        """Load the model (frozen, eval mode) and its tokenizer."""
        from knlight.lm.loading import load_lm

        return load_lm(self.model, self.tokenizer, self.dtype, device=device, gguf_file=self.gguf_file)


@functools.lru_cache(maxsize=64)
def model_kind(model: str, gguf_file: str | None = None) -> str:
    """Says whether a model is ``"masked"`` or ``"causal"`` from its config alone (never loads weights).

    Args:
        model: ``tiny:<arch>[:seed]``, a packaged name, a local folder / ``.gguf`` file or a hub id.
        gguf_file: GGUF file name inside ``model``.
    """
    from knlight.lm.loading import load_config, model_source
    from knlight.lm.real import NAMED_MODEL_TYPES
    from knlight.lm.sites import spec_for

    if model.startswith("tiny:"):
        model_source(model)  # a clear error for an unknown tiny architecture
        return "masked" if spec_for(model.split(":")[1]).masked else "causal"
    if model in NAMED_MODEL_TYPES:
        return "masked" if spec_for(NAMED_MODEL_TYPES[model]).masked else "causal"
    return "masked" if spec_for(load_config(model, gguf_file).model_type).masked else "causal"


@functools.lru_cache(maxsize=64)
def model_dims(model: str, gguf_file: str | None = None) -> tuple[int, int]:
    """``(num_layers, d_ff)`` of a model from its config (tiny ones are built, real ones on ``meta``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from knlight.lm.loading import load_config, load_lm
    from knlight.lm.sites import resolve_sites, spec_for

    if model.startswith("tiny:"):
        lm = load_lm(model)
        return lm.num_layers, lm.d_ff
    config = load_config(model, gguf_file)
    auto = AutoModelForMaskedLM if spec_for(config.model_type).masked else AutoModelForCausalLM
    with torch.device("meta"):
        skeleton = auto.from_config(config)
    sites = resolve_sites(skeleton)
    return sites.num_layers, sites.d_ff
