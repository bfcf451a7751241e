"""The ``knlight`` command: LightningCLI's fit/validate/test/predict over knlight's tasks and data, and the
commands of :mod:`knlight.commands` (``select``, ``summary``, ``data build``), all listed by ``knlight --help``.

Examples::

    knlight predict --config configs/tiny/localize.yaml
    knlight predict --config configs/localize/mgpt.yaml --trainer.devices 4 --trainer.strategy ddp
    knlight predict --config configs/tiny/localize.yaml --print_config
    knlight predict --help    # every option, documented from the classes' docstrings
    knlight select --attributions runs/tiny-localize/attributions --output neurons.json
    knlight data build mpararel --help
"""

from __future__ import annotations

import logging
import sys
from typing import Any, cast

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import (
    ArgsType,
    LightningArgumentParser,
    LightningCLI,
    SaveConfigCallback,
    _get_short_description,
)
from lightning.pytorch.loggers import TensorBoardLogger

from knlight.callbacks.fit_resume import resolve_fit
from knlight.commands import COMMANDS, command_parser, run_command
from knlight.errors import KnlightError
from knlight.tasks.base import BaseTask


def model_kind_of(task: Any) -> str | None:
    """``"masked"`` / ``"causal"`` for the data module, from the instantiated task (reads only the config)."""
    return getattr(task, "model_kind", None)


DESCRIPTION = (
    "knlight: find, test and use knowledge neurons in multilingual language models. Run a subcommand with "
    "a config, e.g. `knlight predict --config configs/tiny/localize.yaml`; `knlight predict --help` lists "
    "every option."
)


class KnlightSaveConfig(SaveConfigCallback):
    """Saves ``config.yaml`` in the log dir (LightningCLI's default) and adds it as text to TensorBoard."""

    def save_config(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        config = self.parser.dump(self.config, skip_none=False)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                # Indented text renders as a code block in TensorBoard's markdown.
                logger.experiment.add_text("config", "\n".join("    " + line for line in config.splitlines()))
                logger.experiment.flush()


class KnlightCLI(LightningCLI):
    """LightningCLI for knlight: any :class:`BaseTask` as the model, any LightningDataModule as the data.

    The data module's ``model_kind`` is computed from the model (never configured twice): ``masked`` for
    masked LMs, ``causal`` otherwise.
    """

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """LightningCLI's trainer subcommands, then knlight's own commands (so ``knlight --help`` lists them;
        :func:`main` runs those before LightningCLI parses anything)."""
        self._subcommand_parsers: dict[str, LightningArgumentParser] = {}
        subcommands = parser.add_subcommands()
        for subcommand in self.subcommands():
            description = _get_short_description(getattr(self.trainer_class, subcommand))
            subparser_kwargs = {"description": description, **kwargs.get(subcommand, {})}
            trainer_class = cast(type, self.trainer_class)
            subparser = self._prepare_subcommand_parser(trainer_class, subcommand, **subparser_kwargs)
            self._subcommand_parsers[subcommand] = subparser
            subcommands.add_subcommand(subcommand, subparser, help=description)
        for name, (_, _, help_text) in COMMANDS.items():
            subcommands.add_subcommand(name, command_parser(name), help=help_text)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(
            "model", "data.init_args.model_kind", compute_fn=model_kind_of, apply_on="instantiate"
        )

    def before_fit(self) -> None:
        """A re-run of a killed fit resumes in its own run folder (see :mod:`knlight.callbacks.fit_resume`)."""
        config = self.config_init[self.subcommand]
        config["ckpt_path"] = resolve_fit(
            self.trainer, self.model, self.datamodule, config.get("ckpt_path"), config.get("seed_everything")
        )


def user_error(error: BaseException) -> KnlightError | None:
    """The :class:`KnlightError` behind ``error`` (itself, or in its cause/context chain), if any."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, KnlightError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


class _DropAdvertising(logging.Filter):
    """Lightning's "💡 Tip: try installing ..." lines are advertising, not information about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("💡")


def quiet_upstream() -> None:
    """Silence what is noise to a knlight user; knlight's own warnings and upstream UserWarnings stay."""
    import warnings

    from transformers.utils import logging as transformers_logging

    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropAdvertising())
    transformers_logging.disable_progress_bar()  # "Loading weights" bars of local folders
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(transformers|lightning|torch)(\.|$)")
    logging.getLogger("transformers.utils.generic").setLevel(logging.ERROR)  # keyword deprecation notices
    # knlight keeps the frozen language model in eval mode on purpose (no dropout while editing).
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")


def main(args: ArgsType = None) -> None:
    """Runs the ``knlight`` command line (in-process callers get knlight's errors as exceptions).

    Args:
        args: Command-line arguments (default ``sys.argv[1:]``), e.g.
            ``["predict", "--config", "configs/tiny/localize.yaml"]`` or ``["select", "--help"]``.
    """
    from jsonargparse import set_parsing_settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    quiet_upstream()
    # Option dataclasses document their fields with attribute docstrings: --help and --print_config show them.
    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else None
    if argv and argv[0] in COMMANDS:
        run_command(argv[0], argv[1:])
        return
    _run(args)


def console_main(args: ArgsType = None) -> None:
    """The ``knlight`` console script and ``python -m knlight``: :func:`main` for people at a terminal.

    A user error (:class:`~knlight.errors.KnlightError`: bad data, a setting out of range, an unknown model...)
    is printed as one line on stderr and exits with status 2; any other exception keeps its traceback.
    """
    try:
        main(args)
    except Exception as error:
        known = user_error(error)
        if known is None:
            raise
        print(f"knlight: error: {known}", file=sys.stderr)
        raise SystemExit(2) from None


def _run(args: ArgsType) -> None:
    KnlightCLI(
        model_class=BaseTask,
        datamodule_class=LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=KnlightSaveConfig,
        save_config_kwargs={"overwrite": True},
        # Attribution and editing need autograd; inference_mode tensors cannot be differentiated.
        trainer_defaults={"inference_mode": False},
        parser_kwargs={"description": DESCRIPTION},
        seed_everything_default=0,
        args=args,
    )
