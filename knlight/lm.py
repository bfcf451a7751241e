"""Loading a language model and describing it for knowledge-neuron work."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from knlight.neurons.prompts import EncodedQuery, encode_query
from knlight.neurons.sites import NeuronSites, resolve_sites, spec_for
from knlight.real_models import NAMED_MODELS, model_folder

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Accept ``torch.float32`` or names such as ``"bf16"``/``"float16"``."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


@dataclass
class LanguageModel:
    """A Hugging Face LM-head model, its tokenizer and its resolved neuron sites.

    The base weights are frozen (``requires_grad_(False)``): knlight never trains them; attribution takes
    gradients with respect to activations only, and editing trains separate neuron deltas.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    sites: NeuronSites = field(init=False)

    def __post_init__(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)
        self.sites = resolve_sites(self.model)
        if self.tokenizer.pad_token_id is None:
            # Padding is always masked out; any id will do, EOS is the conventional choice.
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token

    @property
    def masked(self) -> bool:
        """True for masked LMs (targets are mask positions), False for causal LMs."""
        return self.sites.spec.masked

    @property
    def num_layers(self) -> int:
        return self.sites.num_layers

    @property
    def d_ff(self) -> int:
        return self.sites.d_ff

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def baseline_token_id(self) -> int:
        """Token that replaces a word for the AMIG baseline: [MASK] (masked LMs) or EOS (causal LMs)."""
        token = self.tokenizer.mask_token_id if self.masked else self.tokenizer.eos_token_id
        if token is None:
            raise ValueError(
                f"tokenizer {type(self.tokenizer).__name__} has no {'mask' if self.masked else 'EOS'} token"
            )
        return int(token)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)  # type: ignore[arg-type]

    def encode(self, query: str, answer: str) -> EncodedQuery:
        """Encode a cloze query (object slot ``[Y]``) and its answer; see :func:`encode_query`."""
        return encode_query(
            self.tokenizer, query, answer, masked=self.masked, mask_token_id=self.tokenizer.mask_token_id
        )


def load_lm(
    model_or_name_or_path: str | Path | PreTrainedModel,
    tokenizer: str | Path | PreTrainedTokenizerBase | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    device: str | torch.device | None = None,
    gguf_file: str | None = None,
    **from_pretrained_kwargs: Any,
) -> LanguageModel:
    """Load (or wrap) a language model for knowledge-neuron work.

    Args:
        model_or_name_or_path: A loaded Hugging Face LM-head model, a hub id (elsewhere; no hub here), a local
            folder / ``.gguf`` file, a named packaged model (``"gemma3-270m"``, see :mod:`knlight.real_models`)
            or ``"tiny:<model_type>"`` (a tiny random model, see :mod:`knlight.tiny`).
        tokenizer: Tokenizer, or where to load it from (default: same as the model).
        dtype: Weight/compute dtype (``"float32"`` default, ``"bf16"``, ``"fp16"``).
        device: Where to put the model (default: leave it where it is / CPU).
        gguf_file: GGUF file name inside ``model_or_name_or_path`` (a path ending in ``.gguf`` sets it too).
        from_pretrained_kwargs: Passed to ``from_pretrained``.
    """
    torch_dtype = parse_dtype(dtype)
    if isinstance(model_or_name_or_path, str) and model_or_name_or_path.startswith("tiny:"):
        return _load_tiny(model_or_name_or_path, torch_dtype)
    if isinstance(model_or_name_or_path, str) and model_or_name_or_path in NAMED_MODELS:
        model_or_name_or_path = model_folder(model_or_name_or_path)
    if isinstance(model_or_name_or_path, PreTrainedModel):
        model = model_or_name_or_path
        if tokenizer is None:
            raise ValueError(
                "pass the tokenizer along with an already loaded model: load_lm(model, tokenizer)"
            )
    else:
        source = str(model_or_name_or_path)
        if source.endswith(".gguf") and gguf_file is None:
            path = Path(source)
            source, gguf_file = str(path.parent), path.name
        if gguf_file is not None:
            from_pretrained_kwargs["gguf_file"] = gguf_file
        config = AutoConfig.from_pretrained(source, **from_pretrained_kwargs)
        auto = AutoModelForMaskedLM if spec_for(config.model_type).masked else AutoModelForCausalLM
        model = auto.from_pretrained(source, dtype=torch_dtype or torch.float32, **from_pretrained_kwargs)
        if tokenizer is None:
            tokenizer = source
    if not isinstance(tokenizer, PreTrainedTokenizerBase):
        tok_kwargs = (
            {"gguf_file": gguf_file} if gguf_file and str(tokenizer) == str(Path(str(tokenizer))) else {}
        )
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), **tok_kwargs)
    if torch_dtype is not None:
        model = model.to(torch_dtype)  # type: ignore[arg-type]
    if device is not None:
        model = model.to(device)  # type: ignore[arg-type]
    return LanguageModel(model, tokenizer)


def _load_tiny(spec: str, dtype: torch.dtype | None) -> LanguageModel:
    """``tiny:<model_type>[:seed]`` builds a tiny random model offline (see :mod:`knlight.tiny`)."""
    from knlight.tiny import tiny_model_and_tokenizer

    parts = spec.split(":")
    model, tokenizer = tiny_model_and_tokenizer(parts[1], seed=int(parts[2]) if len(parts) > 2 else 0)
    return LanguageModel(model.to(dtype) if dtype else model, tokenizer)
