"""Knowledge editing as a fine-tune restricted to selected neurons (``knlight fit``), and its evaluation.

Three modes (MATRICE's three uses of language-agnostic neurons): ``edit`` (counterfactual editing: only the
chosen neurons' slices, a :class:`~knlight.neurons.edits.NeuronEdit`, are trained on the edit queries of the edit
language(s)), ``inject`` (the facts the unedited model does not know are taught in the edit language(s) and
tested in the others) and ``enhance`` (training-free: the neurons are scaled; ``knlight validate`` / ``test``).

This module holds the Lightning hooks and the wiring. The editing itself is pure torch in :mod:`knlight.editing`
(rules, requests, the row plan and schedule, scoring, the loss, the baselines, the measures); the rows are served
by :class:`~knlight.tasks.editing_data.EditingDataModule`. Checkpoints
(:class:`knlight.callbacks.fit_resume.FitCheckpoint`) hold the deltas, the optimizer and loop state, the current
group and where the schedule stands: a killed fit resumes exactly (:mod:`knlight.tasks.schedule`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch.cli import OptimizerCallable

from knlight.callbacks.fingerprint import describe_callable
from knlight.callbacks.fit_resume import FitResumeError
from knlight.data.datamodule import RMLLamaDataModule, record_items
from knlight.data.records import FactRecord
from knlight.editing import baselines as baseline_methods
from knlight.editing import training as edit_training
from knlight.editing.measures import headline, metric_names
from knlight.editing.options import DirectEdit, EditRequests, EditTraining, check_settings
from knlight.editing.plan import EditPlan, Row, plan_edits, plan_enhancement, plan_facts, schedule
from knlight.editing.requests import EditRequest, build_requests, edit_specs
from knlight.editing.rules import NeuronRule
from knlight.editing.scoring import Scorer
from knlight.lm.options import LMOptions
from knlight.metrics.editing import EditingMetrics, result_table, write_table
from knlight.neurons.edits import NeuronEdit
from knlight.neurons.memory import check_chunk_rows
from knlight.tasks.base import BaseTask
from knlight.tasks.editing_data import EditingDataModule
from knlight.tasks.schedule import schedule_digest

log = logging.getLogger(__name__)

__all__ = ["EditingDataModule", "EditingModule"]  # the data module is named here by the configs' class_path

CHECKPOINT_KEY = "knlight_editing"


class EditingModule(BaseTask):
    """Edit, inject or enhance facts through chosen FFN neurons only (``knlight fit``/``validate``/``test``).

    Only the deltas of the chosen neurons' slices (rows of W_in, incl. gate and up, + bias; columns of W_out)
    are parameters the optimizer sees; the base model stays frozen. At the end of ``fit`` the edit is saved as
    ``edit.safetensors`` in the log dir (see :class:`~knlight.neurons.edits.NeuronEdit`). Validation and test
    write ``editing_<stage>.json`` / ``.csv`` (per method, role, measure and language; see
    :mod:`knlight.metrics.editing`) in the log dir and log every value to the logger. Use it with
    :class:`EditingDataModule`.

    Args:
        lm: The language model (the deltas are float32 whatever its dtype).
        mode: ``edit`` (replace objects), ``inject`` (teach facts the model does not know) or ``enhance``
            (training-free: scale the neurons by ``enhance_factor``; run validate/test).
        neurons: Neuron file (per fact: language-independent set and per-language sets); may be omitted only
            for ``neuron_rule: ffn`` with ``layers``.
        neuron_rule: Which neurons of each fact: ``language_independent``, ``language:<code>`` (that
            language's set), ``uncertainty`` (the uncertainty-aware set), ``degenerate`` (every DKN member),
            ``random`` (as many per layer as the language-independent set, other indices, seeded) or
            ``ffn`` (every neuron of the language-independent set's layers, or of ``layers``).
        layers: Layers for ``neuron_rule: ffn`` (default: the language-independent set's layers).
        requests: Which facts are edited, into what, on which queries (and sequential groups).
        training: Steps, trainable slices, W_in learning-rate scale, locality weight.
        optimizer: Optimizer for the deltas (called with the deltas only), e.g. ``torch.optim.Adam`` with
            ``lr: 0.01``. Weight decay is fine: rows a group does not own are restored after every step.
        baselines: Training-free methods evaluated beside the edit: ``direct`` (Dai et al.'s W_out update),
            ``suppress`` / ``enhance`` (the facts' neurons ×0 / ×2 at every position) and, in enhance mode,
            ``random`` (the random-rule neurons scaled by ``enhance_factor``).
        direct: The λs and embedding of the ``direct`` baseline.
        enhance_factor: Scale of the neurons in ``enhance`` mode.
        inject_unknown_in: ``inject``: a fact qualifies when the model does not know it in the edit languages
            (``requests.edit_languages``) or in every language (``all``, so other-language success is transfer).
        load_edit: Evaluate this saved edit (``edit.safetensors``) instead of a fresh zero edit. It must
            have been made on this model (its base weights at the edited neurons are compared).
        allow_other_model: Apply ``load_edit`` even when it was made on another model (a warning instead of
            an error).
        chunk_rows: Sequences per forward in evaluation, or ``auto``: as many as fit in ``max_memory_gb``.
        max_memory_gb: Budget of ``chunk_rows: auto`` in GiB (null: 90 % of what the device has free).
        seed: Seed of the request choice, the random rule and the training schedule.
    """

    fit_output = "edit.safetensors"
    """What a finished fit writes in its run folder (a run without it is resumed, see
    :mod:`knlight.callbacks.fit_resume`)."""

    def __init__(
        self,
        lm: LMOptions,
        mode: Literal["edit", "inject", "enhance"] = "edit",
        neurons: str | None = None,
        neuron_rule: str = "language_independent",
        layers: list[int] | None = None,
        requests: EditRequests = EditRequests(),
        training: EditTraining = EditTraining(),
        optimizer: OptimizerCallable = torch.optim.Adam,
        baselines: list[str] | None = None,
        direct: DirectEdit = DirectEdit(),
        enhance_factor: float = 2.0,
        inject_unknown_in: Literal["edit_languages", "all"] = "all",
        load_edit: str | None = None,
        allow_other_model: bool = False,
        chunk_rows: int | Literal["auto"] = 64,
        max_memory_gb: float | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(lm)
        check_settings(mode, neuron_rule, baselines or [], neurons, layers)
        check_chunk_rows(chunk_rows, max_memory_gb, "model.init_args")
        self.save_hyperparameters(ignore=["optimizer"])
        self.mode = mode
        self.neurons_path = neurons
        self.neuron_rule = neuron_rule
        self.layers = layers
        self.request_options = requests
        self.training_options = training
        self.optimizer_factory = optimizer
        self.baselines = list(baselines or [])
        self.direct = direct
        self.enhance_factor = enhance_factor
        self.inject_unknown_in = inject_unknown_in
        self.load_edit = load_edit
        self.allow_other_model = allow_other_model
        self.chunk_rows = chunk_rows
        self.max_memory_gb = max_memory_gb
        self.seed = seed
        self.strict_loading = False  # checkpoints hold the deltas only (see on_save_checkpoint)
        self.edit: NeuronEdit | None = None
        self.metrics: EditingMetrics | None = None
        self.plan: EditPlan | None = None
        self.rule: NeuronRule | None = None
        self.scorer: Scorer | None = None
        self._records: list[FactRecord] | None = None
        self._baselines: dict[str, NeuronEdit] | None = None
        self._group: int | None = None
        self._schedule_digest: str | None = None  # of the schedule being trained
        self._resumed_schedule: str | None = None  # of the schedule a checkpoint was trained on

    # ------------------------------------------------------------------------------------------------------
    # set-up

    def use_records(self, records: Sequence[FactRecord]) -> None:
        """Give the records directly (outside a Trainer); otherwise they come from the datamodule."""
        self._records = list(records)

    def _data(self) -> RMLLamaDataModule | None:
        trainer = self._trainer
        return getattr(trainer, "datamodule", None) if trainer is not None else None

    def records(self) -> list[FactRecord]:
        """The records the module works on (the datamodule's selection)."""
        if self._records is None:
            data = self._data()
            if data is None or not hasattr(data, "records"):
                raise RuntimeError(
                    "EditingModule needs an RML-LAMA datamodule (data: "
                    "knlight.tasks.editing.EditingDataModule) or records given with use_records()"
                )
            self._records = list(data.records())
        return self._records

    @property
    def requests(self) -> list[EditRequest]:
        """The facts edited (after set-up; none in ``enhance`` mode)."""
        return [] if self.plan is None else self.plan.requests

    @property
    def eval_rows(self) -> list[Row]:
        """The evaluation rows (after set-up)."""
        return [] if self.plan is None else self.plan.eval_rows

    @property
    def kl_rows(self) -> list[Row]:
        """The unrelated queries of the locality term (after set-up)."""
        return [] if self.plan is None else self.plan.kl_rows

    def on_lm_loaded(self) -> None:
        """Plans the edit (requests, neurons, rows), builds the NeuronEdit and the metrics."""
        trainer = self._trainer
        if trainer is not None:  # planning runs forwards (inject): do them on the run's device
            self.lm.model.to(trainer.strategy.root_device)  # type: ignore[arg-type]
        self.scorer = Scorer(self.lm, self.chunk_rows, self.max_memory_gb)
        self.plan = self._plan()
        if self.mode != "enhance":
            self.edit = edit_training.prepare_edit(
                self.lm, self.requests, trainable=self.training_options.trainable, metadata=self._provenance(),
                load_edit=self.load_edit, allow_other_model=self.allow_other_model,
            )  # fmt: skip
        self.metrics = EditingMetrics(metric_names(self.eval_rows, self.method_names()))

    def _items(self, record: FactRecord) -> list[Row]:
        return record_items(record, self.model_kind)

    def _plan(self) -> EditPlan:
        options, lm = self.request_options, self.lm
        plan = plan_facts(self.records(), options.edit_languages)
        self.rule = NeuronRule.read(
            self.neuron_rule, self.neurons_path, lm.num_layers, lm.d_ff, self.seed, self.layers
        )
        if self.mode == "enhance":
            plan_enhancement(plan, self.rule, self._items)
            return plan
        data = self._data()
        split = getattr(data, "split_fractions", (0.8, 0.1, 0.1)), getattr(data, "seed", 0)
        specs = edit_specs(options.edits, self.records(), *split, self.seed)
        where = plan.train_languages if self.inject_unknown_in == "edit_languages" else plan.languages
        scorer = self.scorer
        assert scorer is not None
        requests = build_requests(
            specs, plan.by_fact, mode=self.mode, train_languages=plan.train_languages, rule=self.rule,
            options=options, unknown=lambda uuid: scorer.unknown(plan.by_fact[uuid], where, self._items),
        )  # fmt: skip
        plan_edits(plan, requests, self._items, options.edit_queries, self.seed)
        return plan

    def _provenance(self) -> dict[str, Any]:
        return edit_training.provenance(
            self.requests, model_name=self.model_name, method=f"finetune:{self.mode}:{self.neuron_rule}",
            training=self.training_options, options=self.request_options,
            optimizer=describe_callable(self.optimizer_factory),
        )  # fmt: skip

    def fingerprint(self) -> dict[str, Any]:
        """The hyperparameters and the optimizer (class and arguments): what a resumed fit must share."""
        return {**super().fingerprint(), "optimizer": describe_callable(self.optimizer_factory)}

    # ------------------------------------------------------------------------------------------------------
    # rows served by EditingDataModule

    def rows(self, stage: str) -> list[Row]:
        """Rows of a stage: ``train`` (the schedule) or ``val``/``test`` (evaluation rows, padded)."""
        world = self._trainer.world_size if self._trainer is not None else 1
        if stage == "train":
            if self.mode == "enhance":
                raise RuntimeError("mode=enhance is training-free: run `knlight validate` or `knlight test`")
            data = self._data()
            rows = self.schedule(getattr(data, "batch_size", 8) * world)
            self._schedule_digest = schedule_digest(rows)
            if self._resumed_schedule not in (None, self._schedule_digest):
                raise FitResumeError(
                    "the checkpoint this fit resumes from was trained on another schedule of rows (other "
                    "data, requests or global batch); start a new run instead (--trainer.callbacks.init_args."
                    "resume new)"
                )
            return rows
        rows = [dict(r, row_id=k) for k, r in enumerate(self.eval_rows)]
        rows += [{"pad": True}] * (-len(rows) % world)  # no DistributedSampler duplicates
        return rows

    def schedule(self, global_batch: int) -> list[Row]:
        """The training rows in order: per group, ``steps`` global batches of ``global_batch`` rows (see
        :func:`knlight.editing.plan.schedule`)."""
        assert self.plan is not None
        return schedule(self.plan, self.training_options.steps, global_batch, self.seed)

    # ------------------------------------------------------------------------------------------------------
    # training

    def train(self, mode: bool = True) -> EditingModule:
        """Lightning switches modules to train mode; the frozen LM stays in eval mode (no dropout)."""
        super().train(mode)
        if self.net is not None:
            self.net.eval()
        return self

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The injected optimizer over the deltas only."""
        if self.edit is None:
            raise RuntimeError("mode=enhance is training-free: run `knlight validate` or `knlight test`")
        return edit_training.make_optimizer(self.edit, self.training_options, self.optimizer_factory)

    def training_step(self, batch: list[Row], batch_idx: int = 0) -> torch.Tensor:
        """Weighted −log P(new) + locality_weight · KL on the batch's rows (exact global mean under DDP)."""
        assert self.edit is not None and self.scorer is not None
        world = self.trainer.world_size if self._trainer is not None else 1
        locality_weight = self.training_options.locality_weight
        step = edit_training.edit_loss(self.lm, self.edit, self.scorer, batch, locality_weight, world)
        if step.rows:
            self.log_dict(step.logged(), batch_size=step.rows)
        return step.loss

    def on_train_batch_start(self, batch: list[Row], batch_idx: int) -> None:
        """Sequential editing: a new group starts with fresh optimizer state (its own fine-tune)."""
        group = batch[0]["group"]
        if self._group is not None and group != self._group:
            for optimizer in self.trainer.optimizers:
                optimizer.state.clear()
        self._group = group

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        """Steps, then writes back the exact values of rows the current group does not own."""
        frozen = edit_training.frozen_rows(self.edit, self.requests, self._group)
        with edit_training.rows_kept(frozen):
            super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)

    def on_fit_end(self) -> None:
        """Saves the edit (``edit.safetensors``) in the log dir."""
        if self.edit is None:
            return
        out_dir = self._out_dir()  # collective under DDP: every rank asks
        if not self.trainer.is_global_zero:
            return
        path = self.edit.save(Path(out_dir) / self.fit_output, **self._provenance())
        log.info("edit saved to %s (%d neurons)", path, len(self.edit.neurons))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Checkpoints keep the deltas, not the frozen language model, and where the schedule stands."""
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("net.")]:
            del state[key]
        checkpoint[CHECKPOINT_KEY] = {"group": self._group, "schedule": self._schedule_digest}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming: the current editing group (its optimizer state is in the checkpoint) and the schedule."""
        state = checkpoint.get(CHECKPOINT_KEY, {})
        self._group = state.get("group")
        self._resumed_schedule = state.get("schedule")

    # ------------------------------------------------------------------------------------------------------
    # evaluation

    def method_names(self) -> list[str]:
        """Methods evaluated side by side: ``unedited``, the edit, and the selected baselines."""
        return baseline_methods.method_names(self.mode, self.baselines)

    def _baseline_edits(self) -> dict[str, NeuronEdit]:
        """The training-free edits (built once, on the model's device)."""
        if self._baselines is None:
            assert self.plan is not None and self.rule is not None and self.scorer is not None
            self._baselines = baseline_methods.baseline_edits(
                self.lm, self.plan, mode=self.mode, baselines=self.baselines, rule=self.rule, scorer=self.scorer,
                direct=self.direct, enhance_factor=self.enhance_factor, model_name=self.model_name,
            )  # fmt: skip
        return self._baselines

    def validation_step(self, batch: list[Row], batch_idx: int = 0) -> None:
        self._evaluate(batch)

    def test_step(self, batch: list[Row], batch_idx: int = 0) -> None:
        self._evaluate(batch)

    @torch.no_grad()
    def _evaluate(self, batch: list[Row]) -> None:
        assert self.metrics is not None and self.scorer is not None
        rows = [r for r in batch if not r.get("pad")]
        if not rows:
            return
        measured = baseline_methods.score_methods(
            rows, self.method_names(), self.lm, self.edit, self._baseline_edits, self.scorer
        )
        for method, role, measure, language, value in measured:
            self.metrics.update(method, role, measure, language, value)

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def _finish(self, stage: str) -> None:
        assert self.metrics is not None
        if self.trainer.sanity_checking:
            self.metrics.reset()
            return
        values = self.metrics.compute()  # synchronised over processes
        self.metrics.reset()
        for name, (value, count) in values.items():
            if count:
                self.log(f"{stage}/{name}", value, sync_dist=False)
        out_dir = self._out_dir()  # collective under DDP: every rank asks
        if self.trainer.is_global_zero:
            num_neurons = 0 if self.edit is None else len(self.edit.neurons)
            extra = {"stage": stage, "mode": self.mode, "neuron_rule": self.neuron_rule, "model": self.model_name,
                     "num_neurons": num_neurons, "global_step": self.trainer.global_step,
                     "world_size": self.trainer.world_size, "requests": [asdict(r) for r in self.requests]}  # fmt: skip
            path = write_table(result_table(values), out_dir, f"editing_{stage}", extra)
            log.info("editing results: %s", path)
            for method in self.method_names():
                log.info("%s %s: %s", stage, method, headline(values, method))

    def _out_dir(self) -> str:
        trainer = self.trainer
        return trainer.log_dir or trainer.default_root_dir
