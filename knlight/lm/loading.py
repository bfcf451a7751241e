"""Loading a language model: local folders and ``.gguf`` files, packaged real models, tiny random models, hub ids.

A mistyped packaged or tiny name is an error with a suggestion, never a trip to the hub; a name nothing can
load is one clear error. Pure torch + transformers.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from knlight.errors import ConfigError, KnlightError
from knlight.lm.model import LanguageModel
from knlight.lm.real import NAMED_MODELS, NO_HUB_KERNELS, model_folder
from knlight.lm.sites import spec_for

_DTYPES = {
    "float64": torch.float64,
    "fp64": torch.float64,
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
        raise ConfigError(f"unknown dtype {dtype!r} (model.init_args.dtype); use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


class ModelNotFoundError(KnlightError, OSError):
    """A model name that is no local path, packaged model, tiny model or loadable hub id."""


def model_source(name: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """Where transformers loads ``name`` from: ``(folder or hub id, gguf file name or None)``.

    A packaged name (:data:`knlight.lm.real.NAMED_MODELS`) becomes its converted folder (converted on first
    use); a path ending in ``.gguf`` becomes its folder and file name. A name that is not a local path but
    nearly a packaged or tiny name (a typo) is an error instead of a trip to the hub.

    Raises:
        ModelNotFoundError: For a mistyped packaged or tiny name.
    """
    if name in NAMED_MODELS:
        return str(model_folder(name)), gguf_file
    if name.startswith("tiny:"):
        from knlight.lm.tiny import ARCHITECTURES

        arch = name.split(":")[1]
        if arch not in ARCHITECTURES:
            close = difflib.get_close_matches(arch, ARCHITECTURES, n=1, cutoff=0.5)
            hint = f"; did you mean tiny:{close[0]}?" if close else ""
            raise ModelNotFoundError(
                f"unknown tiny model {name!r}{hint} Tiny models: {', '.join('tiny:' + a for a in ARCHITECTURES)}"
            )
        return name, gguf_file
    path = Path(name).expanduser()
    if not path.exists():
        close = difflib.get_close_matches(name.lower(), list(NAMED_MODELS), n=1, cutoff=0.75)
        if close:
            raise ModelNotFoundError(
                f"unknown model name {name!r}; did you mean {close[0]!r}? (packaged models: "
                f"{', '.join(sorted(NAMED_MODELS))}; or give a local folder / .gguf file, tiny:<arch> or a hub id)"
            )
    if name.endswith(".gguf") and gguf_file is None:
        return str(path.parent), path.name
    return name, gguf_file


def _not_found(name: str, error: Exception) -> ModelNotFoundError:
    path = Path(name).expanduser()
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return ModelNotFoundError(
        f"cannot load model {name!r}: it is not a local folder or .gguf file ({path.resolve()} does not exist or "
        f"holds no model), not a packaged model ({', '.join(sorted(NAMED_MODELS))}) and not tiny:<arch>, and "
        f"transformers could not load it as a hub id ({first_line}). Pass a local path, a packaged name, "
        "tiny:<arch>, or a hub id with network access."
    )


def load_config(name: str, gguf_file: str | None = None) -> PretrainedConfig:
    """The transformers config of a model (no weights are loaded); see :func:`model_source`.

    Raises:
        ModelNotFoundError: When the name cannot be resolved to a config.
    """
    source, gguf = model_source(name, gguf_file)
    try:
        return AutoConfig.from_pretrained(source, **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError) as error:
        raise _not_found(name, error) from None


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
            folder / ``.gguf`` file, a named packaged model (``"gemma3-270m"``, ``"smollm2-135m"``, see
            :mod:`knlight.lm.real`) or ``"tiny:<model_type>"`` (a tiny random model, see :mod:`knlight.lm.tiny`).
        tokenizer: Tokenizer, or where to load it from (default: same as the model).
        dtype: Weight/compute dtype (``"float32"`` default, ``"bf16"``, ``"fp16"``).
        device: Where to put the model (default: leave it where it is / CPU).
        gguf_file: GGUF file name inside ``model_or_name_or_path`` (a path ending in ``.gguf`` sets it too).
        from_pretrained_kwargs: Passed to ``from_pretrained``.
    """
    torch_dtype = parse_dtype(dtype)
    if isinstance(model_or_name_or_path, str) and model_or_name_or_path.startswith("tiny:"):
        model_source(model_or_name_or_path)  # a clear error for an unknown tiny architecture
        return _load_tiny(model_or_name_or_path, torch_dtype)
    if isinstance(model_or_name_or_path, PreTrainedModel):
        model = model_or_name_or_path
        if tokenizer is None:
            raise ValueError(
                "pass the tokenizer along with an already loaded model: load_lm(model, tokenizer)"
            )
    else:
        name = str(model_or_name_or_path)
        source, gguf_file = model_source(name, gguf_file)
        if gguf_file is not None:
            from_pretrained_kwargs["gguf_file"] = gguf_file
        try:
            config = AutoConfig.from_pretrained(source, **from_pretrained_kwargs)
            auto = AutoModelForMaskedLM if spec_for(config.model_type).masked else AutoModelForCausalLM
            model_kwargs = {**NO_HUB_KERNELS, **from_pretrained_kwargs}
            model = auto.from_pretrained(source, dtype=torch_dtype or torch.float32, **model_kwargs)
        except OSError as error:
            raise _not_found(name, error) from None
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
    """``tiny:<model_type>[:seed]`` builds a tiny random model offline (see :mod:`knlight.lm.tiny`)."""
    from knlight.lm.tiny import tiny_model_and_tokenizer

    parts = spec.split(":")
    model, tokenizer = tiny_model_and_tokenizer(parts[1], seed=int(parts[2]) if len(parts) > 2 else 0)
    return LanguageModel(model.to(dtype) if dtype else model, tokenizer)
