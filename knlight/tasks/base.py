"""The common base of knlight's LightningModules: a lazily loaded, frozen language model."""

from __future__ import annotations

import dataclasses
import logging
import typing
from collections.abc import Hashable
from typing import Any

import lightning.pytorch as pl
from torch import nn

from knlight.io import short_hash
from knlight.lm import LanguageModel, load_lm
from knlight.lm.identity import model_identity
from knlight.lm.options import LMOptions, model_kind

log = logging.getLogger(__name__)

ItemKey = tuple[Hashable, ...]


class BaseTask(pl.LightningModule):
    """A LightningModule around one frozen language model, loaded lazily.

    Setup order (fixed): ``__init__`` only records the arguments (so parsing a config never loads weights);
    ``configure_model`` loads the LM on each process (so every DDP worker has its own copy, created under the
    strategy's device/dtype context), registers it as the submodule ``net`` (so Lightning moves it to the
    device) and then calls :meth:`on_lm_loaded` for subclass set-up that needs the model.

    Subclasses that produce one output per data item can skip items already done in an earlier run: a
    prediction writer fills :attr:`done_keys` and the subclass filters with :meth:`is_done`.

    Args:
        lm: The language model (name or path, tokenizer, dtype, GGUF file).
    """

    def __init__(self, lm: LMOptions) -> None:
        super().__init__()
        self.lm_options = lm
        self._lm: LanguageModel | None = None
        self.net: nn.Module | None = None
        self.done_keys: set[ItemKey] = set()
        self._model_identity: dict[str, Any] | None = None

    @property
    def model_name(self) -> str:
        """The model as configured (``lm.model``)."""
        return self.lm_options.model

    @property
    def model_kind(self) -> str:
        """``"masked"`` or ``"causal"``, from the model's config (no weights are loaded)."""
        return model_kind(self.lm_options.model, self.lm_options.gguf_file)

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
        options = self.lm_options
        self._lm = load_lm(options.model, options.tokenizer, options.dtype, gguf_file=options.gguf_file)
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

    def flat_hparams(self) -> dict[str, Any]:
        """The task's hyperparameters, flat: the fields of its option blocks (``lm``, ``ig``, ...: the
        arguments typed as dataclasses) at the top level beside the other arguments (LightningCLI's bookkeeping
        entries left out). LightningCLI stores the blocks as dicts, direct construction as dataclasses."""
        hints = typing.get_type_hints(type(self).__init__)
        blocks = {name for name, hint in hints.items() if dataclasses.is_dataclass(hint)}
        out: dict[str, Any] = {}
        for key, value in self.hparams.items():
            if key.startswith("_"):
                continue
            if key in blocks and dataclasses.is_dataclass(value) and not isinstance(value, type):
                out.update(dataclasses.asdict(value))
            elif key in blocks and isinstance(value, dict):
                out.update(value)
            else:
                out[key] = value
        return out

    def fingerprint(self) -> dict[str, Any]:
        """The settings that determine this task's results (used to refuse mixing runs on resume)."""
        return self.flat_hparams()
