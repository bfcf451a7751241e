"""Crash-safe ``knlight fit``: a periodic ``last.ckpt`` and automatic resumption in the run's own folder.

A fit whose trainer has a :class:`FitCheckpoint` callback keeps ``<run>/checkpoints/last.ckpt`` (the task's
trainable state, e.g. an edit's deltas, with the optimizer and loop state; never the frozen language model)
and records its settings in ``<run>/fit.json``. Re-running the same command after a crash (even SIGKILL)
resumes, in the same run folder (the same logger version), from that checkpoint:

* ``ckpt_path`` unset (the default): the newest unfinished run of the same settings resumes; a run is
  finished once it wrote its result (the task's ``fit_output``, e.g. ``edit.safetensors``), and then a
  re-run starts a new version as before. When the newest run is unfinished, has a checkpoint and other
  settings, the run is refused with the settings that differ (progress would be silently left behind):
  resume it with its settings, or start a new version beside it with ``FitCheckpoint(resume="new")``
  (``--trainer.callbacks.init_args.resume new``). A run without a checkpoint (it failed during set-up) has
  no progress to protect and does not block.
* ``--ckpt_path last``: the same choice; with no unfinished run of these settings a new version starts (with
  a warning, as Lightning does when there is no last checkpoint).
* ``--ckpt_path <file>`` inside a run folder of this logger: resumes in that folder (settings checked).

The settings (:func:`knlight.callbacks.fingerprint.fit_fingerprint`) are the task's hyperparameters (including
the optimizer), the data module's (except the per-process batch size and workers), the content of every input
file they name (records, neuron file, edit requests), the global batch, the trainer settings that change the
result (precision, epochs, steps, accumulation, clipping) and the seed. Rank 0 takes a lock on the run
folder, so two concurrent fits never write into one folder; DDP processes started by Lightning inherit rank
0's choice (environment variable ``KNLIGHT_FIT_RUN``).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
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

from knlight.callbacks.fingerprint import differences, fit_fingerprint
from knlight.errors import ConfigError, DataError, KnlightError
from knlight.io import read_json, write_text_atomically

log = logging.getLogger(__name__)

RECORD = "fit.json"
"""Settings of a fit run, in its run folder."""
FORMAT = "knlight-fit/1"
LOCK = ".fit.lock"
ENV = "KNLIGHT_FIT_RUN"
LAST = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION
_VERSION = re.compile(r"version_(\d+)$")
_locks: list[IO[str]] = []


class FitResumeError(KnlightError, RuntimeError):
    """A fit that cannot resume or start: other settings in the run folder, a corrupt file, a busy folder."""


class FitCheckpoint(ModelCheckpoint):
    """Keeps ``<run>/checkpoints/last.ckpt`` up to date so that a killed ``knlight fit`` can resume.

    The checkpoint holds what the task puts in it (an :class:`~knlight.tasks.editing.EditingModule`: its
    deltas, not the frozen model) and the optimizer and loop state. See :mod:`knlight.callbacks.fit_resume` for
    when a re-run resumes.

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


def _refusal(
    folder: Path, recorded: dict[str, Any], fingerprint: dict[str, Any], what: str = "an unfinished"
) -> FitResumeError:
    return FitResumeError(
        f"{folder} holds {what} `knlight fit` with other settings "
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
                    raise _refusal(folder, recorded, fingerprint, "a")
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
    now = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    record = {"format": FORMAT, "fingerprint": fingerprint, "started": now, "resumed": []}
    if choice.resumed and (choice.folder / RECORD).is_file():
        record = read_json(choice.folder / RECORD)
        record["resumed"] = [*record.get("resumed", []), {"at": now, "ckpt_path": choice.ckpt_path}]
    write_text_atomically(choice.folder / RECORD, json.dumps(record, indent=1, sort_keys=True) + "\n")
    return choice


def resolve_fit(
    trainer: pl.Trainer, model: pl.LightningModule, datamodule: Any, ckpt_path: str | None, seed: Any = None
) -> str | None:
    """Choose the run folder and checkpoint of a fit (see the module documentation); returns the ``ckpt_path``.

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
