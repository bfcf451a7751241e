"""Fidelity and cost of the approximate attribution methods against exact IG, on the same queries, in one run.

Every method of ``ig.method`` (``ig``: exact per-layer IG; the labelled approximations ``grad_x_act``,
``steps1_zero`` and ``joint_ig`` of :mod:`knlight.neurons.approx`) attributes the same queries; each
approximation is then compared with exact IG:

* **Spearman** rank correlation of the scores, over all neurons of a query (overall) and within each layer,
  averaged over queries;
* **top-k overlap** ``|top-k(method) ∩ top-k(IG)| / k`` over all neurons of a query (k = 5, 20);
* **Dai neurons**: the neurons knlight's own selection (:func:`knlight.selection.select_fact`: coarse
  ``Attr > τ·max``, refined by prompt sharing p per (fact, language), not adaptive) picks from each method's
  scores, compared with the ones it picks from exact IG's: Jaccard (pooled over records), precision and recall;
* on **planted** models (``benchmarks/planted.py``'s plants, gpt2 / llama / bert × seeds): precision and recall of
  each method's Dai neurons against the planted carriers (the same scoring as planted.py's ``dai/global``);
* on a **real model** (Gemma 3 270M; mParaRel queries in 3 languages built by knlight's data builder): the same
  fidelity numbers, and the **cost** of each method: s/query and peak memory (RSS above the loaded model, sampled),
  each method in its own subprocess over the same batches.

Settings shared by every method: zero baseline, F = P(answer), right-Riemann nodes, m = ``--steps`` (``ig``,
``joint_ig``), no completeness rows, fp32 on CPU, ``--threads`` torch threads.

    python benchmarks/fidelity.py            # planted 3 archs x 3 seeds + Gemma 3 270M, ~70 mParaRel queries
    python benchmarks/fidelity.py --quick    # smoke test: one small plant, tiny:gpt2 on the quickstart facts
                                             # (its methods run in this process: --isolate for subprocesses)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

# benchmarks/planted.py (imported, not copied): its selection glue over select_fact and its scoring helpers.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import planted as planted_bench

from knlight import attribute_batch, load_lm
from knlight.io import write_text_atomically
from knlight.neurons.ig import METHODS
from knlight.planted import plant
from knlight.selection import KnOptions

log = logging.getLogger("benchmarks.fidelity")
APPROXIMATE = tuple(m for m in METHODS if m != "ig")
TOP_KS = (5, 20)
ROOT = Path(__file__).resolve().parent.parent
QUICK_PLANT = {"steps": 40, "n_relations": 2, "facts_per_relation": 2, "templates_per_relation": 3,
               "hidden": 64, "ff": 128, "n_background": 16}  # fmt: skip
Record = tuple[str, str]


# ------------------------------------------------------------------------------------------------------------
# Fidelity metrics


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of a flat tensor, ties sharing their mean rank (float64)."""
    order = torch.argsort(x)
    _, inverse, counts = torch.unique_consecutive(x[order], return_inverse=True, return_counts=True)
    mean_rank = counts.cumsum(0).double() - (counts.double() - 1) / 2
    ranks = torch.empty(x.numel(), dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two flat tensors (NaN when one is constant)."""
    ra, rb = average_ranks(a.flatten()), average_ranks(b.flatten())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float(ra @ rb) / denominator if denominator > 0 else math.nan


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int) -> float:
    """``|top-k(a) ∩ top-k(b)| / k`` over all entries."""
    k = min(k, a.numel())
    top_a = set(torch.topk(a.flatten(), k).indices.tolist())
    return len(top_a & set(torch.topk(b.flatten(), k).indices.tolist())) / k


def mean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def score_fidelity(scores: torch.Tensor, exact: torch.Tensor) -> dict[str, Any]:
    """Spearman (overall and per layer) and top-k overlap of ``scores`` ``[Q, L, d]`` against exact IG's."""
    layers = scores.shape[1]
    per_layer = [
        mean([spearman(s[layer], e[layer]) for s, e in zip(scores, exact)]) for layer in range(layers)
    ]
    return {
        "spearman": mean([spearman(s, e) for s, e in zip(scores, exact)]),
        "spearman_per_layer": per_layer,
        "spearman_layer_mean": mean(per_layer),
        "spearman_layer_min": min(per_layer),
        **{f"top{k}": mean([top_overlap(s, e, k) for s, e in zip(scores, exact)]) for k in TOP_KS},
    }


def dai_sets(records: list[dict[str, Any]], owner: torch.Tensor, scores: torch.Tensor, kn: KnOptions
             ) -> dict[Record, set[tuple[int, int]]]:  # fmt: skip
    """Per (fact, language) record, the Dai neurons ``select_fact`` picks from ``scores`` (rows owned by records,
    in the order of each record's queries)."""
    items = planted_bench.query_items(SimpleNamespace(records=records), scores, owner)  # type: ignore[arg-type]
    dims = (scores.shape[1], scores.shape[2])
    out = {}
    for uuid, per_language in planted_bench.by_fact(items).items():
        fact = planted_bench.select(per_language, dims, kn)
        for language in per_language:
            out[(uuid, language)] = set(fact.languages[language])
    return out


def set_agreement(picked: dict[Record, set[Any]], exact: dict[Record, set[Any]]) -> dict[str, float]:
    """Pooled Jaccard, precision and recall of ``picked`` against ``exact`` over all records."""
    both = sum(len(picked[r] & exact[r]) for r in exact)
    union = sum(len(picked[r] | exact[r]) for r in exact)
    n_picked, n_exact = sum(len(picked[r]) for r in exact), sum(len(exact[r]) for r in exact)
    return {
        "jaccard": both / union if union else math.nan,
        "precision": both / n_picked if n_picked else math.nan,
        "recall": both / n_exact if n_exact else math.nan,
        "neurons_per_record": n_picked / len(exact) if exact else math.nan,
    }


def compare_methods(
    records: list[dict[str, Any]], owner: torch.Tensor, scores: dict[str, torch.Tensor], kn: KnOptions
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[Record, set[tuple[int, int]]]]]:
    """Per method: its fidelity against exact IG (none for ``ig`` itself) and its Dai neurons per record."""
    sets = {method: dai_sets(records, owner, s, kn) for method, s in scores.items()}
    out: dict[str, dict[str, Any]] = {
        "ig": {"dai_neurons_per_record": set_agreement(sets["ig"], sets["ig"])["neurons_per_record"]}
    }
    for method in (m for m in scores if m != "ig"):
        agreement = set_agreement(sets[method], sets["ig"])
        out[method] = {
            **score_fidelity(scores[method], scores["ig"]),
            **{f"dai_{k}": v for k, v in agreement.items() if k != "neurons_per_record"},
            "dai_neurons_per_record": agreement["neurons_per_record"],
        }
    return out, sets


# ------------------------------------------------------------------------------------------------------------
# Planted models


def planted_run(arch: str, seed: int, steps: int, kn: KnOptions, overrides: dict[str, Any]) -> dict[str, Any]:
    """Every method on one plant: fidelity against exact IG and precision/recall against the planted carriers."""
    planted = plant(arch, seed, **overrides)
    lm, records = planted.lm, planted.records
    items = [lm.encode(query, rec["object"]) for rec in records for query in rec["queries"]]
    owner = torch.tensor([r for r, rec in enumerate(records) for _ in rec["queries"]])
    scores, seconds = {}, {}
    for method in METHODS:
        start = time.perf_counter()
        scores[method] = attribute_batch(lm, items, method=method, steps=steps, completeness=False).scores
        seconds[method] = time.perf_counter() - start
    results, sets = compare_methods(records, owner, scores, kn)
    for method, picked in sets.items():
        tp = fp = fn = 0
        for (uuid, language), chosen in picked.items():
            carriers = {(n.layer, n.index) for n in planted.neurons_for(uuid, language)}
            tp, fp, fn = tp + len(chosen & carriers), fp + len(chosen - carriers), fn + len(carriers - chosen)
        results[method]["truth"] = {**planted_bench.prf(tp, fp, fn), "tp": tp, "fp": fp, "fn": fn}
        results[method]["s_per_query"] = seconds[method] / len(items)
    log.info("%s seed %d: %s", arch, seed, ", ".join(
        f"{m} rho {results[m].get('spearman', 1.0):.2f} truth P {results[m]['truth']['precision']:.2f} "
        f"R {results[m]['truth']['recall']:.2f}" for m in METHODS))  # fmt: skip
    return {"arch": arch, "seed": seed, "queries": len(items), "p_clean": planted.report["p_clean"],
            "methods": results}  # fmt: skip


# ------------------------------------------------------------------------------------------------------------
# Real model: queries, and one subprocess per method (its own peak memory)


def mpararel_records(root: Path, languages: list[str], relations: list[str], facts: int, queries: int
                     ) -> list[dict[str, Any]]:  # fmt: skip
    """Causal-LM records from mParaRel by knlight's builder (facts in every language), at most ``queries`` each."""
    from knlight.data.build import build_mpararel
    from knlight.data.pipeline import BuildOptions

    options = BuildOptions(languages=languages, relations=relations, max_facts_per_relation=facts,
                           model_kind="causal", num_wrong_objects=0, seed=0)  # fmt: skip
    built, _ = build_mpararel(root, options)
    return [{"uuid": r.uuid, "relation": r.relation, "language": r.language, "object": r.object,
             "queries": r.queries[:queries]} for r in built]  # fmt: skip


def file_records(path: Path, facts: int | None, queries: int) -> list[dict[str, Any]]:
    """Records of an RML-LAMA JSONL file (the first ``facts`` facts), at most ``queries`` queries each."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    keep = sorted({r["uuid"] for r in rows})[:facts]
    return [{"uuid": r["uuid"], "relation": r["relation"], "language": r["language"], "object": r["object"],
             "queries": r["queries"][:queries]} for r in rows if r["uuid"] in keep]  # fmt: skip


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakRss:
    """Samples the RSS every few ms while active: ``peak_mb`` is the highest RSS above the one at entry."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval, self.peak, self.base = interval, 0, 0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, current_rss())

    def __enter__(self) -> PeakRss:
        self.base = self.peak = current_rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())

    @property
    def peak_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def worker(method: str, model: str, records_path: str, out: str, steps: int, batch: int) -> None:
    """One method on every query of the records, in batches; writes scores, times and peak memory (torch.save)."""
    records = json.loads(Path(records_path).read_text(encoding="utf-8"))
    lm = load_lm(model)
    items = [lm.encode(query, rec["object"]) for rec in records for query in rec["queries"]]
    options = dict(method=method, steps=steps, completeness=False)
    with PeakRss() as memory:
        attribute_batch(lm, items[:1], **options)  # warm-up (not timed): first-call allocations and kernels
        start, cpu_start = time.perf_counter(), time.process_time()
        parts = [attribute_batch(lm, items[i : i + batch], **options) for i in range(0, len(items), batch)]
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    torch.save({"scores": torch.cat([p.scores for p in parts]), "prob": torch.cat([p.prob for p in parts]),
                "method": parts[0].method, "seconds": seconds, "cpu_seconds": cpu_seconds,
                "peak_mb": memory.peak_mb,
                "tokens": [len(e.input_ids) for e in items], "targets": [len(e.targets) for e in items]},
               out)  # fmt: skip


def real_run(model: str, records: list[dict[str, Any]], steps: int, batch: int, threads: int, kn: KnOptions,
             isolate: bool = True) -> dict[str, Any]:  # fmt: skip
    """Every method on a real model, each in its own subprocess (``isolate``; else one after the other in this
    process, where a method's peak memory can hide in what an earlier one left); fidelity and cost."""
    owner = torch.tensor([r for r, rec in enumerate(records) for _ in rec["queries"]])
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        records_path = Path(tmp) / "records.json"
        records_path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
        for method in METHODS:
            out = Path(tmp) / f"{method}.pt"
            cmd = [sys.executable, __file__, "--worker", method, model, str(records_path), str(out),
                   "--steps", str(steps), "--batch", str(batch), "--threads", str(threads)]  # fmt: skip
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            if isolate:
                subprocess.run(cmd, check=True, env=env)
            else:
                worker(method, model, str(records_path), str(out), steps, batch)
            results[method] = torch.load(out)
            if results[method]["method"] != method:
                raise RuntimeError(f"{method}: the result is labelled {results[method]['method']!r}")
            log.info("%s on %s: %.3f s/query (CPU %.3f s), peak %.0f MB above the model", method, model,
                     results[method]["seconds"] / len(owner), results[method]["cpu_seconds"] / len(owner),
                     results[method]["peak_mb"])  # fmt: skip
    scores = {method: r["scores"] for method, r in results.items()}
    fidelity, _ = compare_methods(records, owner, scores, kn)
    ig = results["ig"]
    for method, r in results.items():
        fidelity[method].update(s_per_query=r["seconds"] / len(owner), cpu_s_per_query=r["cpu_seconds"] / len(owner),
                                peak_mb=r["peak_mb"], cheaper_than_ig=ig["seconds"] / r["seconds"],
                                cpu_cheaper_than_ig=ig["cpu_seconds"] / r["cpu_seconds"])  # fmt: skip
    first = results["ig"]
    return {
        "model": model,
        "queries": len(owner),
        "records": len(records),
        "facts": len({r["uuid"] for r in records}),
        "languages": sorted({r["language"] for r in records}),
        "relations": sorted({r["relation"] for r in records}),
        "tokens_per_query": sum(first["tokens"]) / len(owner),
        "targets_per_query": sum(first["targets"]) / len(owner),
        "mean_p_answer": float(first["prob"].mean()),
        "methods": fidelity,
    }


# ------------------------------------------------------------------------------------------------------------
# Summary and table


def commit() -> str | None:
    """The repository's HEAD commit, ``+dirty`` when the library or benchmark code differs from it (outside a git
    checkout, e.g. a ``git archive`` copy: $KNLIGHT_COMMIT)."""
    if os.environ.get("KNLIGHT_COMMIT"):
        return os.environ["KNLIGHT_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        changed = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "knlight", "benchmarks"],
            cwd=ROOT, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if changed else "")


def summarise_planted(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Per arch (and ``all``), per method, mean±std over runs of every scalar metric."""
    out = {}
    for arch in [*dict.fromkeys(r["arch"] for r in runs), "all"]:
        chosen = [r for r in runs if arch in ("all", r["arch"])]
        out[arch] = {}
        for method in METHODS:
            flat = [planted_bench.flatten(r["methods"][method]) for r in chosen]
            keys = sorted({k for f in flat for k in f})
            out[arch][method] = {k: planted_bench.summarise([f.get(k, math.nan) for f in flat]) for k in keys}
    return out


def cell(value: float | None, digits: int = 2) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


COLUMNS = [("Spearman", "spearman", 2), ("ρ layer mean", "spearman_layer_mean", 2),
           ("ρ layer min", "spearman_layer_min", 2), ("top-5", "top5", 2), ("top-20", "top20", 2),
           ("Dai J", "dai_jaccard", 2), ("Dai P", "dai_precision", 2), ("Dai R", "dai_recall", 2),
           ("Dai n", "dai_neurons_per_record", 1)]  # fmt: skip


def table(result: dict[str, Any]) -> str:
    """The printed report: planted (mean±std over seeds) and real-model tables."""
    lines = []
    planted = result.get("planted")
    if planted:
        lines.append(f"Planted models ({len(planted['runs'])} plants; mean±std over seeds; vs exact IG; truth: "
                     "Dai neurons vs the planted carriers)")  # fmt: skip
        header = ["arch", "method", *[c[0] for c in COLUMNS], "truth P", "truth R", "ms/query"]
        lines.append(" | ".join(header))
        for arch, methods in planted["summary"].items():
            for method, s in methods.items():

                def get(key: str, digits: int = 2, scale: float = 1.0, s: dict = s) -> str:
                    v = s.get(key)
                    if v is None or math.isnan(v["mean"]):
                        return "–"
                    return f"{v['mean'] * scale:.{digits}f}±{v['std'] * scale:.{digits}f}"

                cells = [get(key, digits) for _, key, digits in COLUMNS]
                cells += [get("truth.precision"), get("truth.recall"), get("s_per_query", 1, 1000.0)]
                lines.append(" | ".join([arch, method, *cells]))
    real = result.get("real")
    if real:
        lines += ["", f"{real['model']}: {real['queries']} queries ({real['records']} records, {real['facts']} "
                  f"facts, languages {', '.join(real['languages'])}; {real['tokens_per_query']:.1f} tokens, "
                  f"{real['targets_per_query']:.2f} answer tokens per query; mean P(answer) "
                  f"{real['mean_p_answer']:.3f})"]  # fmt: skip
        header = ["method", *[c[0] for c in COLUMNS], "s/query", "CPU s/query", "× cheaper (wall)",
                  "× cheaper (CPU)", "peak MB"]  # fmt: skip
        lines.append(" | ".join(header))
        for method, r in real["methods"].items():
            cells = [cell(r.get(key), digits) for _, key, digits in COLUMNS]
            cells += [cell(r["s_per_query"], 3), cell(r["cpu_s_per_query"], 3), cell(r["cheaper_than_ig"], 1),
                      cell(r["cpu_cheaper_than_ig"], 1), cell(r["peak_mb"], 0)]  # fmt: skip
            lines.append(" | ".join([method, *cells]))
        for method, r in real["methods"].items():
            if method != "ig":
                per_layer = ", ".join(f"{v:.2f}" for v in r["spearman_per_layer"])
                lines.append(f"  {method} Spearman per layer: {per_layer}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="smoke test: one small plant, tiny:gpt2, m = 4")
    parser.add_argument("--archs", nargs="+", default=["gpt2", "llama", "bert"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--plant", type=json.loads, default={}, help="PlantConfig overrides as JSON")
    parser.add_argument("--model", default="gemma3-270m", help="the real model (a knlight.load_lm name)")
    parser.add_argument("--mpararel", type=Path, default=ROOT.parent / "shared" / "data" / "mpararel")
    parser.add_argument("--records", type=Path, default=None, help="an RML-LAMA JSONL instead of mParaRel")
    parser.add_argument("--languages", nargs="+", default=["en", "es", "ja"])
    parser.add_argument("--relations", nargs="+", default=["P36", "P30", "P37"])
    parser.add_argument(
        "--facts", type=int, default=2, help="facts per relation (mParaRel) or in all (--records)"
    )
    parser.add_argument("--queries", type=int, default=4, help="queries per (fact, language) at most")
    parser.add_argument("--steps", type=int, default=20, help="quadrature nodes m of ig and joint_ig")
    parser.add_argument("--batch", type=int, default=4, help="queries per attribute_batch call (real model)")
    parser.add_argument("--tau", type=float, default=0.2, help="Dai coarse threshold")
    parser.add_argument("--p", type=float, default=0.7, help="Dai prompt-sharing fraction")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-planted", action="store_true")
    parser.add_argument("--skip-real", action="store_true")
    parser.add_argument(
        "--planted-from",
        type=Path,
        default=None,
        help="take the planted part from an earlier result JSON (same settings) instead of re-planting",
    )
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="each method of the real model in its own subprocess (default; --quick: not)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="default benchmarks/results/fidelity[_quick].json"
    )
    parser.add_argument(
        "--worker", nargs=4, metavar=("METHOD", "MODEL", "RECORDS", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker:
        worker(*args.worker, steps=args.steps, batch=args.batch)
        return {}
    if args.quick:
        args.archs, args.seeds, args.plant = ["gpt2"], [0], {**QUICK_PLANT, **args.plant}
        args.model, args.steps, args.facts, args.queries = "tiny:gpt2", 4, 2, 2
        args.records = args.records or ROOT / "knlight" / "resources" / "quickstart.jsonl"
    out = args.out or Path(f"benchmarks/results/fidelity{'_quick' if args.quick else ''}.json")
    kn = KnOptions(threshold=args.tau, p=args.p, adaptive=False)
    start = time.perf_counter()
    result: dict[str, Any] = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "methods": list(METHODS), "commit": commit()}  # fmt: skip
    records = None
    if not args.skip_real:  # first: a wrong data path fails before the plants are built
        records = (
            file_records(args.records, args.facts, args.queries)
            if args.records
            else mpararel_records(args.mpararel, args.languages, args.relations, args.facts, args.queries)
        )
    if args.planted_from is not None:
        earlier = json.loads(args.planted_from.read_text(encoding="utf-8"))
        keys = ("archs", "seeds", "plant", "steps", "tau", "p", "threads")
        if any(earlier["args"][k] != getattr(args, k) for k in keys):
            raise SystemExit(f"--planted-from {args.planted_from}: its settings differ in {keys}")
        result.update(planted=earlier["planted"], planted_seconds=earlier["planted_seconds"],
                      planted_commit=earlier.get("commit"))  # fmt: skip
    elif not args.skip_planted:
        runs = [planted_run(a, s, args.steps, kn, args.plant) for a in args.archs for s in args.seeds]
        result["planted"] = {"runs": runs, "summary": summarise_planted(runs)}
        result["planted_seconds"] = time.perf_counter() - start
        write_text_atomically(out, json.dumps(result, indent=1, ensure_ascii=False, default=float) + "\n")
    if records is not None:
        isolate = not args.quick if args.isolate is None else args.isolate
        result["real"] = real_run(args.model, records, args.steps, args.batch, args.threads, kn, isolate)
        result["real"]["isolated"] = isolate
    result["seconds"] = time.perf_counter() - start
    write_text_atomically(out, json.dumps(result, indent=1, ensure_ascii=False, default=float) + "\n")
    print(table(result))
    print(f"\nwrote {out} ({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    main()
