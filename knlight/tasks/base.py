"""The common base of knlight's LightningModules: a lazily loaded, frozen language model."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Hashable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from knlight.lm import LanguageModel, load_lm

log = logging.getLogger(__name__)

ItemKey = tuple[Hashable, ...]


@functools.lru_cache(maxsize=64)
def model_kind(model: str, gguf_file: str | None = None) -> str:
    """Says whether a model is ``"masked"`` or ``"causal"`` from its config alone (never loads weights).

    Args:
        model: ``tiny:<arch>[:seed]``, a local folder / ``.gguf`` file or a hub id (reads only its config).
        gguf_file: GGUF file name inside ``model``.

    Returns:
        ``"masked"`` or ``"causal"``.
    """
    from knlight.lm import load_config, model_source
    from knlight.lm.real import NAMED_MODEL_TYPES
    from knlight.lm.sites import spec_for

    if model.startswith("tiny:"):
        model_source(model)  # a clear error for an unknown tiny architecture
        arch = model.split(":")[1]
        return "masked" if spec_for(arch).masked else "causal"
    if model in NAMED_MODEL_TYPES:
        return "masked" if spec_for(NAMED_MODEL_TYPES[model]).masked else "causal"
    config = load_config(model, gguf_file)
    return "masked" if spec_for(config.model_type).masked else "causal"


def short_hash(value: Any) -> str:
    """16 hex digits of the SHA-256 of a JSON-serialisable value (canonical JSON: sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def model_identity(name: str, lm: LanguageModel) -> dict[str, Any]:
    """What identifies a loaded model's results: its name, architecture, weights and tokenizer.

    Hashing every weight would take minutes for a large model; a sample of each parameter (its first and last
    values and a strided few) changes whenever the weights differ in practice (another seed, checkpoint or
    fine-tune), as the parameter names and shapes change with the architecture.

    Args:
        name: The model as configured (``tiny:gpt2``, a hub id, a folder).
        lm: The loaded model.

    Returns:
        ``{"name", "type", "parameters", "shapes", "weights", "tokenizer"}``: the name, the transformers
        ``model_type``, the number of parameters, and short hashes of the parameter names / shapes / dtypes, of
        the weight samples and of the tokenizer's vocabulary.
    """
    shapes, samples = hashlib.sha256(), hashlib.sha256()
    count = 0
    for parameter_name, parameter in sorted(lm.model.named_parameters()):
        count += parameter.numel()
        shapes.update(f"{parameter_name}:{tuple(parameter.shape)}:{parameter.dtype};".encode())
        if parameter.is_meta or parameter.numel() == 0:
            continue  # not materialised (offloaded): its shape still counts
        flat = parameter.detach().reshape(-1)
        stride = max(1, flat.numel() // 8)
        sample = torch.cat([flat[:8], flat[::stride][:8], flat[-8:]]).float().cpu()
        samples.update(parameter_name.encode() + sample.numpy().tobytes())
    vocab = sorted(lm.tokenizer.get_vocab().items())
    return {
        "name": name,
        "type": getattr(lm.model.config, "model_type", type(lm.model).__name__),
        "parameters": count,
        "shapes": shapes.hexdigest()[:16],
        "weights": samples.hexdigest()[:16],
        "tokenizer": short_hash(vocab),
    }


class BaseTask(pl.LightningModule):
    """A LightningModule around one frozen language model, loaded lazily.

    Setup order (fixed): ``__init__`` only records the arguments (so parsing a config never loads weights);
    ``configure_model`` loads the LM on each process (so every DDP worker has its own copy, created under the
    strategy's device/dtype context), registers it as the submodule ``net`` (so Lightning moves it to the
    device) and then calls :meth:`on_lm_loaded` for subclass set-up that needs the model.

    Subclasses that produce one output per data item can skip items already done in an earlier run: a
    prediction writer fills :attr:`done_keys` and the subclass filters with :meth:`is_done`.

    Args:
        model: Hub id, local folder or ``.gguf`` file, or ``tiny:<arch>[:seed]`` for a tiny random model.
        tokenizer: Where to load the tokenizer from (default: the model's).
        dtype: Weight and compute dtype (``float32`` by default; ``bf16``, ``fp16``).
        gguf_file: GGUF file name inside ``model`` (a ``model`` path ending in ``.gguf`` sets it too).
    """

    def __init__(
        self,
        model: str,
        tokenizer: str | None = None,
        dtype: str | None = None,
        gguf_file: str | None = None,
    ) -> None:
        super().__init__()
        self.model_name = model
        self.tokenizer_name = tokenizer
        self.dtype_name = dtype
        self.gguf_file = gguf_file
        self._lm: LanguageModel | None = None
        self.net: nn.Module | None = None
        self.done_keys: set[ItemKey] = set()
        self._model_identity: dict[str, Any] | None = None

    @property
    def model_kind(self) -> str:
        """``"masked"`` or ``"causal"``, from the model's config (no weights are loaded)."""
        return model_kind(self.model_name, self.gguf_file)

    @property
    def lm(self) -> LanguageModel:
        """The loaded language model (after ``configure_model``)."""
        if self._lm is None:
            raise RuntimeError(
                f"{type(self).__name__}: the language model is not loaded yet; it is loaded in "
                "configure_model (the Trainer calls it) or by calling configure_model() yourself."
            )
        return self._lm

    def configure_model(self) -> None:
        """Loads the language model once per process, then calls :meth:`on_lm_loaded`."""
        if self._lm is not None:
            return
        log.info("loading %s", self.model_name)
        self._lm = load_lm(self.model_name, self.tokenizer_name, self.dtype_name, gguf_file=self.gguf_file)
        self.net = self._lm.model
        self.on_lm_loaded()

    def on_lm_loaded(self) -> None:
        """Hook for subclasses: runs once, right after the language model is loaded."""

    @staticmethod
    def item_key(item: dict[str, Any]) -> ItemKey:
        """Identity of one data item: ``(uuid, language, query_id)``."""
        return (item["uuid"], item["language"], item["query_id"])

    def is_done(self, item: dict[str, Any]) -> bool:
        """True when an earlier run already produced this item's output (see :attr:`done_keys`)."""
        return self.item_key(item) in self.done_keys

    def model_identity(self) -> dict[str, Any]:
        """The loaded model's identity (see :func:`model_identity`), computed once."""
        if self._model_identity is None:
            self._model_identity = model_identity(self.model_name, self.lm)
        return self._model_identity

    def model_hash(self) -> str:
        """A short hash of :meth:`model_identity`, recorded with each result the model produced."""
        return short_hash(self.model_identity())

    def fingerprint(self) -> dict[str, Any]:
        """The hyperparameters that determine this task's results (used to refuse mixing runs on resume)."""
        return {k: v for k, v in self.hparams.items() if not k.startswith("_")}
