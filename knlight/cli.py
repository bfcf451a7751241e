"""The ``knlight`` command line: LightningCLI with fit/validate/test/predict over knlight's tasks and data.

Examples::

    knlight predict --config configs/tiny/localize.yaml
    knlight predict --config configs/localize/mgpt.yaml --trainer.devices 4 --trainer.strategy ddp
    knlight predict --config configs/tiny/localize.yaml --print_config
    knlight predict --help    # every option, documented from the classes' docstrings
"""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import TensorBoardLogger

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

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments(
            "model", "data.init_args.model_kind", compute_fn=model_kind_of, apply_on="instantiate"
        )


def main(args: ArgsType = None) -> None:
    """Runs the ``knlight`` command line.

    Args:
        args: Command-line arguments (default ``sys.argv[1:]``), e.g.
            ``["predict", "--config", "configs/tiny/localize.yaml"]``.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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
