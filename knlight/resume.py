"""Crash-safe ``knlight fit``: a periodic ``last.ckpt`` and automatic resumption in the run's own folder.

A fit whose trainer has a :class:`FitCheckpoint` callback keeps ``<run>/checkpoints/last.ckpt`` (the task's
trainable state, e.g. an edit's deltas, with the optimizer and loop state; never the frozen language model)
and records its settings in ``<run>/fit.json``. Re-running the same command after a crash (even SIGKILL)
resumes, in the same run folder (the same logger version), from that checkpoint:

* ``ckpt_path`` unset (the default): the newest unfinished run of the same settings resumes; a run is
  finished once it wrote its result (the task's ``fit_output``, e.g. ``edit.safetensors``), and then a
  re-run starts a new version as before. When the newest run is unfinished but has other settings, the run
  is refused with the settings that differ: resume it with its settings, or start a new version beside it
  with ``FitCheckpoint(resume="new")`` (``--trainer.callbacks.init_args.resume new``).
* ``--ckpt_path last``: the same choice; with no unfinished run of these settings a new version starts (with
  a warning, as Lightning does when there is no last checkpoint).
* ``--ckpt_path <file>`` inside a run folder of this logger: resumes in that folder (settings checked).

The settings (:func:`fit_fingerprint`) are the task's hyperparameters (including the optimizer), the data
module's (except the per-process batch size and workers), the content of every input file they name
(records, neuron file, edit requests), the global batch, the trainer settings that change the result
(precision, epochs, steps, accumulation, clipping) and the seed. Rank 0 takes a lock on the run folder, so
two concurrent fits never write into one folder; DDP processes started by Lightning inherit rank 0's choice
(environment variable ``KNLIGHT_FIT_RUN``).
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import importlib
import json
import logging
import os
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from knlight.data.errors import DataError
from knlight.data.jsonio import read_json, write_text_atomically
from knlight.errors import ConfigError, KnlightError

log = logging.getLogger(__name__)

RECORD = "fit.json"
"""Settings of a fit run, in its run folder."""
FORMAT = "knlight-fit/1"
LOCK = ".fit.lock"
ENV = "KNLIGHT_FIT_RUN"
LAST = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION
# Data settings that do not change the result: the global batch (recorded separately) does.
_DATA_LAYOUT = ("batch_size", "num_workers")
_VERSION = re.compile(r"version_(\d+)$")
_WHOLE_FILE_LIMIT = 1 << 30
_locks: list[IO[str]] = []


class FitResumeError(KnlightError, RuntimeError):
    """A fit that cannot resume or start: other settings in the run folder, a corrupt file, a busy folder."""


class FitCheckpoint(ModelCheckpoint):
    """Keeps ``<run>/checkpoints/last.ckpt`` up to date so that a killed ``knlight fit`` can resume.

    The checkpoint holds what the task puts in it (an :class:`~knlight.tasks.editing.EditingModule`: its
    deltas, not the frozen model) and the optimizer and loop state. See :mod:`knlight.resume` for when a
    re-run resumes.

    Args:
        every_n_train_steps: Save after every this many optimizer steps.
        resume: ``auto``: re-running resumes the newest unfinished run of the same settings (and refuses when
            the newest run is unfinished with other settings); ``new``: always start a new run folder.
    """

    def __init__(self, every_n_train_steps: int = 50, resume: Literal["auto", "new"] = "auto") -> None:
        if every_n_train_steps < 1:
            raise ConfigError(
                f"trainer.callbacks.init_args.every_n_train_steps={every_n_train_steps}: give a positive number "
                "of optimizer steps between checkpoints"
            )
        if resume not in ("auto", "new"):
            raise ConfigError(
                f"trainer.callbacks.init_args.resume={resume!r}: choose auto (resume unfinished runs) or new"
            )
        super().__init__(
            save_last=True,
            save_top_k=0,
            every_n_train_steps=every_n_train_steps,
            enable_version_counter=False,
        )
        self.resume = resume

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        _release_locks()  # the run folder is free again (a process's exit frees it too)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        super().on_exception(trainer, pl_module, exception)
        _release_locks()


# ----------------------------------------------------------------------------------------------------------
# settings


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


# ----------------------------------------------------------------------------------------------------------
# run folders


@dataclass
class _Runs:
    """Where a trainer's runs live: numbered versions under ``root``, or one fixed folder."""

    root: Path
    fixed: Path | None = None  # a user-given logger version, or default_root_dir without a logger
    fixed_version: int | str | None = None

    def folder(self, version: int | str | None) -> Path:
        if self.fixed is not None:
            return self.fixed
        return self.root / (version if isinstance(version, str) else f"version_{version}")

    def versions(self) -> Sequence[int | str | None]:
        """The run folders' versions, newest first."""
        if self.fixed is not None:
            return [self.fixed_version]
        if not self.root.is_dir():
            return []
        found = (_VERSION.match(p.name) for p in self.root.iterdir() if p.is_dir())
        return sorted((int(m[1]) for m in found if m), reverse=True)

    def next_version(self) -> int | str | None:
        if self.fixed is not None:
            return self.fixed_version
        return 1 + max((v for v in self.versions() if isinstance(v, int)), default=-1)


def _runs_of(trainer: pl.Trainer) -> _Runs | None:
    logger = trainer.logger
    if logger is None:
        return _Runs(Path(trainer.default_root_dir), Path(trainer.default_root_dir), None)
    if not hasattr(logger, "root_dir") or not hasattr(logger, "_version"):
        return None
    runs = _Runs(Path(str(logger.root_dir)))
    version = logger._version  # None until the logger picks the next free version
    if version is not None:
        runs.fixed, runs.fixed_version = runs.folder(version), version
    return runs


def _recorded(folder: Path) -> dict[str, Any] | None:
    """The fingerprint in ``folder/fit.json`` (None when the folder is no fit run)."""
    path = folder / RECORD
    if not path.is_file():
        return None
    try:
        data = read_json(path)
    except DataError as error:
        raise FitResumeError(f"{error} Or delete {folder} to drop that run.") from None
    if (
        not isinstance(data, dict)
        or data.get("format") != FORMAT
        or not isinstance(data.get("fingerprint"), dict)
    ):
        raise FitResumeError(f"{path}: not a knlight fit record ({FORMAT}); delete {folder} to drop that run")
    return data["fingerprint"]


def _checkpoint(folder: Path) -> str | None:
    """``folder/checkpoints/last.ckpt`` when it exists (checked to be a complete file)."""
    path = folder / "checkpoints" / LAST
    if not path.is_file():
        return None
    try:
        with zipfile.ZipFile(path) as archive:  # torch.save writes a zip; a truncated one has no directory
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as error:
        raise FitResumeError(
            f"{path}: the checkpoint of this unfinished run is truncated or corrupt ({error}); delete it to "
            f"restart the run from its first step in {folder}, or start a new run with "
            "--trainer.callbacks.init_args.resume new"
        ) from None
    return str(path)


@dataclass
class _Choice:
    version: int | str | None  # None: no logger (default_root_dir)
    folder: Path
    ckpt_path: str | None
    resumed: bool


def _refusal(folder: Path, recorded: dict[str, Any], fingerprint: dict[str, Any]) -> FitResumeError:
    return FitResumeError(
        f"{folder} holds a `knlight fit` with other settings "
        f"({differences(recorded, fingerprint)}; see {folder / RECORD}). Re-run it with its own settings to "
        "resume it, start a new run beside it with --trainer.callbacks.init_args.resume new, or delete the "
        "folder."
    )


def _choose(
    runs: _Runs, fingerprint: dict[str, Any], ckpt_path: str | None, resume: str, output: str | None
) -> _Choice:
    """The run folder and checkpoint of a fit (see the module documentation)."""

    def state(folder: Path) -> tuple[str, dict[str, Any] | None]:
        recorded = _recorded(folder)
        if recorded is None:
            return "none", None
        if output is not None and (folder / output).exists():
            return "finished", recorded
        if recorded == fingerprint:
            return "same", recorded
        # Without a checkpoint there is no progress to protect (e.g. a run that failed during set-up).
        return ("other" if _checkpoint(folder) else "none"), recorded

    version = runs.next_version()
    new = _Choice(version, runs.folder(version), None, False)
    if ckpt_path not in (None, "last"):  # an explicit checkpoint: resume in its run folder when it has one
        parent = Path(ckpt_path).resolve().parent
        for version in runs.versions():
            folder = runs.folder(version)
            if (folder / "checkpoints").resolve() == parent:
                recorded = _recorded(folder)
                if recorded is not None and recorded != fingerprint:
                    raise _refusal(folder, recorded, fingerprint)
                return _Choice(version, folder, ckpt_path, True)
        new.ckpt_path = ckpt_path  # a checkpoint from elsewhere: train on from it in a new run
        return new
    if ckpt_path is None and resume == "new":
        return new
    states = [(v, runs.folder(v), *state(runs.folder(v))) for v in runs.versions()]  # newest first
    for version, folder, kind, _ in states:
        if kind == "same":
            return _Choice(version, folder, _checkpoint(folder), True)
    newest = next((s for s in states if s[2] != "none"), None)
    if newest is not None and newest[2] == "other" and newest[3] is not None:
        raise _refusal(newest[1], newest[3], fingerprint)
    if ckpt_path == "last":
        log.warning(
            "ckpt_path=last: no unfinished run of these settings in %s; starting a new run", runs.root
        )
    return new


# ----------------------------------------------------------------------------------------------------------
# resolution


def _lock(folder: Path) -> None:
    try:
        import fcntl
    except ImportError:  # no advisory locks on this platform
        return
    handle = open(folder / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 (held for the whole run)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise FitResumeError(
            f"another `knlight fit` is running in {folder}; wait for it to finish (or stop it), or start a "
            "separate run with --trainer.callbacks.init_args.resume new"
        ) from None
    _locks.append(handle)


def _rank() -> int:
    """This process's global rank, from the environment Lightning's launchers set (0 before they start)."""
    return int(getattr(rank_zero_only, "rank", 0))


def _release_locks() -> None:
    while _locks:
        _locks.pop().close()


def _prepare(choice: _Choice, runs: _Runs, fingerprint: dict[str, Any]) -> _Choice:
    """Rank 0: claim the run folder (a new version is created exclusively), lock it, record the settings."""
    _release_locks()  # an earlier fit in this process is over
    while not choice.resumed and runs.fixed is None:
        try:
            choice.folder.mkdir(parents=True)
            break
        except FileExistsError:  # another fit took this version meanwhile
            assert isinstance(choice.version, int)
            choice.version += 1
            choice.folder = runs.folder(choice.version)
    choice.folder.mkdir(parents=True, exist_ok=True)
    _lock(choice.folder)
    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    record = {"format": FORMAT, "fingerprint": fingerprint, "started": now, "resumed": []}
    if choice.resumed and (choice.folder / RECORD).is_file():
        record = read_json(choice.folder / RECORD)
        record["resumed"] = [*record.get("resumed", []), {"at": now, "ckpt_path": choice.ckpt_path}]
    write_text_atomically(choice.folder / RECORD, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return choice


def resolve_fit(
    trainer: pl.Trainer, model: pl.LightningModule, datamodule: Any, ckpt_path: str | None, seed: Any = None
) -> str | None:
    """Choose the run folder and checkpoint of a fit (see :mod:`knlight.resume`); returns the ``ckpt_path``.

    Sets the logger's version to the chosen run folder. Without a :class:`FitCheckpoint`, or for
    ``ckpt_path`` ``best``/``hpc``/``registry``, changes nothing.

    Raises:
        FitResumeError: The newest unfinished run (or the given checkpoint's run) has other settings; its
            record or checkpoint is corrupt; another fit is running in the chosen folder.
    """
    callback = next((c for c in trainer.callbacks if isinstance(c, FitCheckpoint)), None)  # type: ignore[attr-defined]
    if callback is None or (ckpt_path is not None and str(ckpt_path).startswith(("best", "hpc", "registry"))):
        return ckpt_path
    runs = _runs_of(trainer)
    if runs is None:
        log.warning(
            "%s cannot resume runs of a %s logger", type(callback).__name__, type(trainer.logger).__name__
        )
        return ckpt_path
    fingerprint = fit_fingerprint(trainer, model, datamodule, seed)
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    inherited = json.loads(os.environ.get(ENV, "{}"))
    if _rank() > 0 and inherited.get("digest") == digest and inherited.get("root") == str(runs.root):
        choice = _Choice(inherited["version"], Path(inherited["folder"]), inherited["ckpt_path"], True)
    else:
        choice = _choose(runs, fingerprint, None if ckpt_path is None else str(ckpt_path), callback.resume,
                         getattr(model, "fit_output", None))  # fmt: skip
        if _rank() == 0:
            choice = _prepare(choice, runs, fingerprint)
    if choice.version is not None and trainer.logger is not None:
        trainer.logger._version = choice.version  # type: ignore[attr-defined]
    # Processes Lightning starts for DDP copy this environment: they take the same folder and checkpoint.
    os.environ[ENV] = json.dumps({"digest": digest, "root": str(runs.root), "version": choice.version,
                                  "folder": str(choice.folder), "ckpt_path": choice.ckpt_path})  # fmt: skip
    if choice.resumed and _rank() == 0:
        log.info("resuming the unfinished fit in %s from %s", choice.folder, choice.ckpt_path or "its start")
    return choice.ckpt_path
