"""What decides a run's result, described so that two runs can be compared (and a resume refused).

:func:`fit_fingerprint` describes a ``knlight fit``: the task's settings, the data module's, the content of the
input files they name, the trainer settings that change the result and the seed (see
:mod:`knlight.callbacks.fit_resume`).
:func:`describe_callable` gives a readable, stable description of an injected class such as an optimizer.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
from pathlib import Path
from typing import Any

import lightning.pytorch as pl

# Data settings that do not change the result: the global batch (recorded separately) does.
_DATA_LAYOUT = ("batch_size", "num_workers")
_WHOLE_FILE_LIMIT = 1 << 30


def class_path(cls: type) -> str:
    """``module.Name`` by the shortest public module that exports it (``torch.optim.Adam``)."""
    parts = cls.__module__.split(".")
    for end in range(1, len(parts) + 1):
        module = ".".join(parts[:end])
        try:
            if getattr(importlib.import_module(module), cls.__qualname__, None) is cls:
                return f"{module}.{cls.__qualname__}"
        except ImportError:
            continue
    return f"{cls.__module__}.{cls.__qualname__}"


def describe_callable(factory: Any) -> dict[str, Any]:
    """A readable, stable description of a class or factory, e.g. an optimizer given to a task.

    Returns:
        ``{"class_path": "torch.optim.Adam", "init_args": {"lr": 0.01, ...}}`` for a class or a partial of
        one (what LightningCLI passes for ``OptimizerCallable``), else ``{"callable": "module.qualname"}``.
    """
    if isinstance(factory, type):
        return {"class_path": class_path(factory), "init_args": {}}
    if isinstance(factory, functools.partial):
        classes = [a for a in (factory.func, *factory.args) if isinstance(a, type)]
        if classes:
            return {"class_path": class_path(classes[-1]), "init_args": _jsonable(factory.keywords)}
        return {
            "callable": describe_callable(factory.func).get("callable"),
            "keywords": _jsonable(factory.keywords),
        }
    module = getattr(factory, "__module__", None) or type(factory).__module__
    name = getattr(factory, "__qualname__", None) or type(factory).__qualname__
    return {"callable": f"{module}.{name}"}


def input_digest(path: Path) -> str:
    """SHA-256 of a file's content; of a folder (a model): its file names and sizes and its ``config.json``.

    A file over 1 GiB (model weights, e.g. GGUF) is summarised by its size and its first and last MiB: reading
    all of it would take longer than the settings check is worth.
    """
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path)}\0{file.stat().st_size}\n".encode())
        path = path / "config.json"
        if not path.is_file():
            return digest.hexdigest()
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if size > _WHOLE_FILE_LIMIT:
            digest.update(f"{size}\n".encode() + handle.read(1 << 20))
            handle.seek(size - (1 << 20))
            digest.update(handle.read())
            return digest.hexdigest()
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def _files(group: str, settings: dict[str, Any]) -> dict[str, str]:
    out = {}
    for key, value in settings.items():
        if isinstance(value, str) and value and Path(value).exists():
            out[f"{group}.{key}"] = input_digest(Path(value))
    return out


def fit_fingerprint(
    trainer: pl.Trainer, model: pl.LightningModule, datamodule: Any, seed: Any
) -> dict[str, Any]:
    """The settings that decide a fit's result; a run resumes only into a run of equal settings.

    Args:
        trainer: The (not yet running) trainer.
        model: The task; its ``fingerprint()`` (default: its hyperparameters).
        datamodule: The data module (its hyperparameters), or None.
        seed: The run's ``seed_everything``.
    """
    task = _jsonable(getattr(model, "fingerprint", lambda: dict(model.hparams))())
    hparams = dict(getattr(datamodule, "hparams", {}))
    data = _jsonable({k: v for k, v in hparams.items() if k not in _DATA_LAYOUT and not k.startswith("_")})
    batch_size = getattr(datamodule, "batch_size", None)
    processes = trainer.num_devices * trainer.num_nodes
    return _jsonable(
        {
            "task": class_path(type(model)),
            "model": task,
            "data": {"class": None if datamodule is None else class_path(type(datamodule)), **data},
            "files": {**_files("model", task), **_files("data", data)},
            "trainer": {
                "global_batch": None if batch_size is None else batch_size * processes,
                "precision": str(trainer.precision),
                "max_epochs": trainer.max_epochs,
                "max_steps": trainer.max_steps,
                "accumulate_grad_batches": trainer.accumulate_grad_batches,
                "gradient_clip_val": trainer.gradient_clip_val,
                "gradient_clip_algorithm": trainer.gradient_clip_algorithm,
                "limit_train_batches": trainer.limit_train_batches,
            },
            "seed": seed,
        }
    )


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def differences(old: dict[str, Any], new: dict[str, Any], limit: int = 8) -> str:
    """``model.steps: 20 -> 30; ...`` for the settings that differ."""
    a, b = _flat(old), _flat(new)
    changed = [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(a.keys() | b.keys())
               if a.get(k) != b.get(k)]  # fmt: skip
    more = f"; and {len(changed) - limit} more" if len(changed) > limit else ""
    return "; ".join(changed[:limit]) + more
