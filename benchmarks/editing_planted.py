"""Cross-lingual knowledge editing on planted models: which neurons must an edit touch to transfer?

A planted model (:func:`knlight.planted.plant`: 12 synthetic facts in 3 disjoint-vocabulary languages, 4
templates each; standard facts carry 2 language-independent + 1 language-specific neuron per language, a third
of the facts a degenerate pair instead) has known knowledge neurons. This benchmark edits half of the standard
facts at once (new object = the fact's first wrong object, an object of the same relation) with
:class:`knlight.tasks.editing.EditingModule` (``knlight fit``), training **only on the first language's
queries** (2 of its 4 templates), with neuron sets from a neuron file written from the planted truth:

* ``LI``: the fact's planted language-independent carriers (W_in rows at 0.1 × lr, W_out columns);
* ``LI, W_in at full lr``: the same with W_in at the full learning rate (the neurons tend to die);
* ``LI, W_out only``: the same with W_in frozen;
* ``<lang>-specific``: the fact's planted language-specific carrier of the edit language;
* ``random``: as many neurons per layer as the language-independent set, at other indices (seeded);
* ``ffn``: every neuron of the language-independent set's layers (whole-FFN fine-tune of those layers);
* ``direct (Dai, LI)``: Dai et al.'s training-free ``W_out[:, n] += 8·E(new) − E(old)`` on the LI carriers.

Reported per method (top-1 of the new object's first token / new object above the old one): reliability (edit
queries), generality in the edit language (its other 2 templates) and in each other language (cross-lingual
transfer), locality (unrelated facts held out from the KL term: top-1 kept) and their mean KL. Targets:
language-independent generality ≥ 0.9 in every language, locality ≥ 0.95; language-specific editing should
transfer markedly less.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/editing_planted.py                      # gpt2, seed 0
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/editing_planted.py --archs gpt2 llama qwen2 bert --seeds 0 1

Plants are cached in ``<work>/plant-<arch>-<seed>`` (delete one to re-plant); results go to
``<work>/results.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from knlight import load_lm
from knlight.editing.options import EditRequests, EditTraining
from knlight.io import read_json, write_text_atomically
from knlight.lm.options import LMOptions
from knlight.lm.prompts import QueryError
from knlight.neurons.neuron_file import FactNeurons, NeuronFile, write_neuron_file
from knlight.planted import PlantedModel, load_planted, plant, write_records
from knlight.tasks.editing import EditingDataModule, EditingModule

log = logging.getLogger("benchmarks.editing_planted")

COLUMNS = ("reliability", "generality_lang", "generality_cross")


def planted_model(arch: str, seed: int, work: Path) -> tuple[PlantedModel, Path]:
    """Plant (or load the cached plant of) ``arch`` with ``seed``; returns it and its folder."""
    folder = work / f"plant-{arch}-{seed}"
    if (folder / "model").is_dir():
        return load_planted(folder), folder
    planted = plant(arch, seed)
    planted.save(folder)
    return planted, folder


def neuron_file_from_truth(planted: PlantedModel, path: Path) -> Path:
    """A neuron file of the planted truth: LI carriers; per language only its language-specific carriers."""
    facts: dict[str, FactNeurons] = {}
    for neuron in planted.neurons:
        fact = facts.setdefault(neuron.uuid, FactNeurons(relation=neuron.uuid.split(":")[0]))
        if neuron.kind == "language_independent":
            fact.language_independent.append((neuron.layer, neuron.index))
        elif neuron.kind == "language_specific":
            for language in neuron.languages:
                fact.languages.setdefault(language, []).append((neuron.layer, neuron.index))
    lm = planted.lm
    return write_neuron_file(
        path, NeuronFile("planted", lm.num_layers, lm.d_ff, {"source": "planted truth"}, facts)
    )


def run_method(
    folder: Path,
    work: Path,
    name: str,
    rule: str,
    trainable: str,
    in_lr_scale: float,
    edits: list[dict[str, Any]],
    language: str,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], float]:
    """One ``fit`` of the editing module; returns the validation table (rows by name) and its seconds."""
    module = EditingModule(
        LMOptions(str(folder / "model")),
        neurons=str(work / "neurons.json"),
        neuron_rule=rule,
        requests=EditRequests(edits=edits, edit_languages=[language], edit_queries=2),
        training=EditTraining(
            steps=args.steps,
            locality_weight=args.locality_weight,
            trainable=trainable,
            in_lr_scale=in_lr_scale,
        ),
        optimizer=lambda params: torch.optim.Adam(params, lr=args.lr),
        baselines=["direct"] if rule == "language_independent" else [],
        seed=0,
    )
    data = EditingDataModule(
        str(folder / "records.jsonl"), batch_size=len(edits) * 2, model_kind=module.model_kind
    )
    trainer = Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=TensorBoardLogger(str(work / "runs"), name="".join(c if c.isalnum() else "_" for c in name)),
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    table = read_json(Path(trainer.log_dir) / "editing_val.json")
    return table, seconds


def summarise(table: dict[str, Any], method: str, language: str, languages: list[str]) -> dict[str, Any]:
    """The headline numbers of one method from an ``editing_val.json`` table."""
    value = {(r["method"], r["role"], r["measure"], r["language"]): r["value"] for r in table["rows"]}
    out: dict[str, Any] = {}
    for role in COLUMNS:
        for measure in ("top1", "rank", "p_new"):
            out[f"{role}/{measure}"] = value.get((method, role, measure, "all"))
    for other in languages:
        if other != language:
            out[f"cross_{other}/top1"] = value.get((method, "generality_cross", "top1", other))
            out[f"cross_{other}/rank"] = value.get((method, "generality_cross", "rank", other))
    out["locality/top1"] = value.get((method, "locality", "top1", "all"))
    out["locality/kl"] = value.get((method, "locality", "kl", "all"))
    return out


def benchmark_one(arch: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Every method on one plant."""
    work = Path(args.work)
    planted, folder = planted_model(arch, seed, work)
    record = planted.records[0]
    try:  # the module loads the saved plant: its tokenizer must round-trip
        load_lm(folder / "model").encode(record["queries"][0], record["object"])
    except QueryError as error:
        raise RuntimeError(f"the saved plant {folder} does not reload usably: {error}") from error
    work = work / f"edit-{arch}-{seed}"
    work.mkdir(parents=True, exist_ok=True)
    neuron_file_from_truth(planted, work / "neurons.json")
    write_records(folder / "records.jsonl", planted.records)
    languages = sorted({r["language"] for r in planted.records})
    language = languages[0]
    standard = sorted({n.uuid for n in planted.neurons if n.kind == "language_independent"})
    edited = standard[: max(1, len(standard) // 2)]
    edits = [{"uuid": uuid} for uuid in edited]
    methods = {  # name: (neuron rule, trained slices, W_in lr scale)
        "LI": ("language_independent", "in_out", args.in_lr_scale),
        "LI, W_in at full lr": ("language_independent", "in_out", 1.0),
        "LI, W_out only": ("language_independent", "out", 1.0),
        f"{language}-specific": (f"language:{language}", "in_out", args.in_lr_scale),
        "random": ("random", "in_out", args.in_lr_scale),
        "ffn": ("ffn", "in_out", args.in_lr_scale),
    }
    results: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    unedited = None
    for name, (rule, trainable, in_lr_scale) in methods.items():
        table, seconds[name] = run_method(
            folder, work, name, rule, trainable, in_lr_scale, edits, language, args
        )
        results[name] = summarise(table, "edited", language, languages) | {"neurons": table["num_neurons"]}
        if unedited is None:
            unedited = summarise(table, "unedited", language, languages)
        if rule == "language_independent" and "direct (Dai, LI)" not in results:
            results["direct (Dai, LI)"] = summarise(table, "direct", language, languages)
        log.info("%s %d %s: %.1fs", arch, seed, name, seconds[name])
    return {
        "arch": arch,
        "seed": seed,
        "edit_language": language,
        "languages": languages,
        "edited_facts": edited,
        "unrelated_facts": len({r["uuid"] for r in planted.records}) - len(edited),
        "plant_report": {k: planted.report.get(k) for k in ("p_clean", "p_suppressed")},
        "unedited": unedited,
        "methods": results,
        "seconds": seconds,
    }


def fmt(value: Any) -> str:
    return "  -  " if value is None else f"{value:5.2f}"


def table_text(run: dict[str, Any]) -> str:
    """A plain-text table of one plant's results (top-1 / rank per column)."""
    others = [lang for lang in run["languages"] if lang != run["edit_language"]]
    header = ["method", "neurons", "reliab", "gen-lang", *[f"→{o}" for o in others], "locality", "KL"]
    lines = [" | ".join(f"{h:>22}" if k == 0 else f"{h:>11}" for k, h in enumerate(header))]
    for name, r in [("unedited", run["unedited"]), *run["methods"].items()]:
        cells = [
            str(r.get("neurons", "")),
            f"{fmt(r['reliability/top1'])}/{fmt(r['reliability/rank'])}",
            f"{fmt(r['generality_lang/top1'])}/{fmt(r['generality_lang/rank'])}",
            *[f"{fmt(r[f'cross_{o}/top1'])}/{fmt(r[f'cross_{o}/rank'])}" for o in others],
            fmt(r["locality/top1"]),
            fmt(r["locality/kl"]),
        ]
        lines.append(" | ".join([f"{name:>22}", *[f"{c:>11}" for c in cells]]))
    return "\n".join(lines)


def summarise_runs(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method, over plants: means (and minima) of reliability, cross-lingual generality and locality."""
    summary: dict[str, dict[str, Any]] = {}
    for name in runs[0]["methods"] if runs else []:
        cells: dict[str, list[float]] = {}
        for run in runs:
            r = run["methods"][name]
            others = [o for o in run["languages"] if o != run["edit_language"]]
            for key, values in (
                ("reliability", [r["reliability/top1"]]),
                ("generality_lang", [r["generality_lang/top1"]]),
                ("generality_cross", [r[f"cross_{o}/top1"] for o in others]),
                ("generality_cross_rank", [r[f"cross_{o}/rank"] for o in others]),
                ("locality", [r["locality/top1"]]),
                ("kl", [r["locality/kl"]]),
            ):
                cells.setdefault(key, []).extend(v for v in values if v is not None)
        summary[name] = {
            **{f"{k}_mean": statistics.fmean(v) for k, v in cells.items() if v},
            **{f"{k}_min": min(v) for k, v in cells.items() if v and k != "kl"},
            "plants": len(runs),
        }
    return summary


def summary_text(summary: dict[str, dict[str, Any]]) -> str:
    """The summary as a table: mean (min) over plants and languages, top-1."""
    keys = ("reliability", "generality_lang", "generality_cross", "generality_cross_rank", "locality")
    lines = [" | ".join([f"{'method':>22}", *[f"{k:>21}" for k in keys], f"{'KL':>6}"])]
    for name, s in summary.items():
        cells = [
            f"{s.get(k + '_mean', float('nan')):.3f} ({s.get(k + '_min', float('nan')):.2f})" for k in keys
        ]
        lines.append(" | ".join([f"{name:>22}", *[f"{c:>21}" for c in cells], f"{s.get('kl_mean', 0):6.2f}"]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--archs", nargs="+", default=["gpt2"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (full batch)")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--locality-weight", type=float, default=1.0)
    parser.add_argument("--in-lr-scale", type=float, default=0.1, help="W_in lr relative to --lr")
    parser.add_argument("--work", default="runs/bench/editing_planted", help="plants and run folders")
    parser.add_argument("--out", default=None, help="JSON results (default <work>/results.json)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    out = Path(args.out or Path(args.work) / "results.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    for arch in args.archs:
        for seed in args.seeds:
            try:
                runs.append(benchmark_one(arch, seed, args))
            except Exception as error:  # one broken plant must not lose the others
                log.exception("%s seed %d failed", arch, seed)
                runs.append({"arch": arch, "seed": seed, "error": f"{type(error).__name__}: {error}"})
            write_text_atomically(out, json.dumps({"args": vars(args), "runs": runs}, indent=1) + "\n")
    done = [run for run in runs if "error" not in run]
    summary = summarise_runs(done)
    write_text_atomically(
        out, json.dumps({"args": vars(args), "summary": summary, "runs": runs}, indent=1) + "\n"
    )
    for run in runs:
        if "error" in run:
            sys.stdout.write(f"\n{run['arch']} seed {run['seed']}: FAILED ({run['error']})\n")
            continue
        head = f"{run['arch']} seed {run['seed']}: edit language {run['edit_language']}"
        sys.stdout.write(
            f"\n{head}, {len(run['edited_facts'])} facts edited, top-1 / rank:\n{table_text(run)}\n"
        )
    sys.stdout.write(f"\n{summary_text(summary)}\nresults: {out}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
