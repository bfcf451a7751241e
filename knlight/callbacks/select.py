"""Selection at the end of ``knlight predict``: the common pipeline in one command.

Add :class:`SelectNeurons` after the :class:`~knlight.callbacks.AttributionWriter` in a predict config; when
the predict loop ends (and the writer has merged every rank's shards), rank 0 runs the selection step
(:func:`knlight.selection.run_selection`'s options) on the merged output and writes the neuron file, reusing
the loaded model for the DKN search. ``knlight select`` does the same from the folder afterwards.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl

from knlight.callbacks.writer import AttributionWriter
from knlight.selection.annotate import needs_model
from knlight.selection.options import (
    CarrierOptions,
    ConsistencyOptions,
    DknOptions,
    KnOptions,
    KnownOptions,
    LapeOptions,
    LiknOptions,
    SpecificityOptions,
    UncertaintyOptions,
)
from knlight.selection.reader import read_attributions
from knlight.selection.run import select_run

log = logging.getLogger(__name__)


class SelectNeurons(pl.Callback):
    """Runs the selection step on the predict run's merged output and writes a neuron file.

    Args:
        output: Where to write the neuron file (default: ``neurons.json`` in the writer's output folder).
        languages: Use only these languages (default: every language of the run).
        kn: Per-language knowledge neurons (coarse τ, prompt sharing p, adaptive p).
        likn: Language-independent neurons.
        uncertainty: Uncertainty-aware aggregation (needs the writer's ``save_scores``).
        dkn: Degenerate neurons (the search runs on the already loaded model).
        known: The knowledge filter (on by default: only what the model knows counts).
        carriers: Carriers vs upstream neurons (direct effects on the already loaded model).
        specificity: Fact-specific vs relation-level vs generic neurons (labels; fact-specific listed first).
        consistency: Consistency of each fact's neurons across its queries (Jaccard, Otsu split).
        lape: Language-specific neurons by activation statistics (LAPE), on the already loaded model.
    """

    def __init__(
        self,
        output: str | None = None,
        languages: list[str] | None = None,
        kn: KnOptions = KnOptions(),
        likn: LiknOptions = LiknOptions(),
        uncertainty: UncertaintyOptions = UncertaintyOptions(),
        dkn: DknOptions = DknOptions(),
        known: KnownOptions = KnownOptions(),
        carriers: CarrierOptions = CarrierOptions(),
        specificity: SpecificityOptions = SpecificityOptions(),
        consistency: ConsistencyOptions = ConsistencyOptions(),
        lape: LapeOptions = LapeOptions(),
    ) -> None:
        super().__init__()
        self.output = output
        self.languages = languages
        self.kn, self.likn, self.uncertainty, self.dkn = kn, likn, uncertainty, dkn
        self.known, self.carriers = known, carriers
        self.specificity, self.consistency, self.lape = specificity, consistency, lape
        self.path: str | None = None

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        writers = [c for c in trainer.callbacks if isinstance(c, AttributionWriter)]  # type: ignore[attr-defined]
        if not writers:
            raise RuntimeError(
                "SelectNeurons needs an AttributionWriter among the callbacks (it reads its output)"
            )
        writer = writers[0]
        writer.finalize(trainer)  # every rank waits for the merge (idempotent)
        if not trainer.is_global_zero:
            return
        assert writer.dir is not None
        run = read_attributions(writer.dir)
        output = self.output or str(writer.dir / "neurons.json")
        model_name = str(run.hparams.get("model") or getattr(pl_module, "model_name", ""))
        model_needed = self.dkn.enabled or self.carriers.enabled or needs_model(self.specificity, self.lape)
        lm = getattr(pl_module, "lm", None) if model_needed else None
        select_run(run, output, model_name, lm, languages=self.languages, kn=self.kn, likn=self.likn,
                   uncertainty=self.uncertainty, dkn=self.dkn, known=self.known, carriers=self.carriers,
                   specificity=self.specificity, consistency=self.consistency, lape=self.lape)  # fmt: skip
        self.path = output
        log.info("neuron file written: %s", output)
