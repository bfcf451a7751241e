"""benchmarks/fidelity.py: its rank metrics against hand-computed values, and its quick mode end to end (a small
plant and tiny:gpt2 on the bundled quickstart facts) with the fields of the JSON it writes (not timings)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "fidelity.py"
METHODS = ["ig", "grad_x_act", "steps1_zero", "joint_ig"]
pytestmark = pytest.mark.usefixtures("one_thread")


def fidelity_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fidelity_benchmark", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rank_metrics_match_hand_computed_values() -> None:
    fid = fidelity_module()
    # Ties share their mean rank.
    assert fid.average_ranks(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    # No ties: 1 - 6 Σd² / (n (n² - 1)) with d = (0, 1, 1, 0).
    assert fid.spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 3, 2, 4])) == pytest.approx(0.8)
    # With ties: Pearson of the ranks (1, 2.5, 2.5, 4) and (1, 2, 3, 4) = 4.5 / sqrt(4.5 * 5).
    assert fid.spearman(torch.tensor([1.0, 2, 2, 3]), torch.arange(4.0)) == pytest.approx(
        4.5 / math.sqrt(22.5)
    )
    assert fid.spearman(torch.tensor([5.0, 4, 3]), torch.tensor([1.0, 2, 3])) == pytest.approx(-1.0)
    assert math.isnan(fid.spearman(torch.ones(3), torch.arange(3.0)))  # a constant has no ranking
    a, b = torch.tensor([9.0, 8, 7, 0, 0, 1]), torch.tensor([9.0, 0, 7, 8, 0, 1])
    assert fid.top_overlap(a, b, 2) == 0.5 and fid.top_overlap(a, b, 3) == pytest.approx(2 / 3)
    agreement = fid.set_agreement({("f", "en"): {1, 2, 3}, ("f", "de"): set()}, {("f", "en"): {2, 3, 4},
                                                                                ("f", "de"): {5}})  # fmt: skip
    assert agreement == {"jaccard": 2 / 5, "precision": 2 / 3, "recall": 2 / 4, "neurons_per_record": 1.5}


def in_unit(value: float) -> bool:
    return 0.0 <= value <= 1.0


def test_quick_mode_runs_end_to_end_and_writes_every_field(tmp_path: Path) -> None:
    out = tmp_path / "fidelity.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"wrote {out}" in run.stdout and "grad_x_act" in run.stdout  # the printed table
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["methods"] == METHODS and result["args"]["quick"] is True

    (plant_run,) = result["planted"]["runs"]
    assert (plant_run["arch"], plant_run["seed"]) == ("gpt2", 0)
    methods = plant_run["methods"]
    assert list(methods) == METHODS
    carriers = {m: methods[m]["truth"]["tp"] + methods[m]["truth"]["fn"] for m in METHODS}
    assert len(set(carriers.values())) == 1 and carriers["ig"] > 0  # every method scored against one truth
    for method in METHODS:
        truth = methods[method]["truth"]
        assert in_unit(truth["recall"]) and methods[method]["s_per_query"] > 0
    for method in METHODS[1:]:
        row = methods[method]
        assert -1 <= row["spearman"] <= 1 and len(row["spearman_per_layer"]) == 4  # the plant's layers
        assert all(in_unit(row[k]) for k in ("top5", "top20", "dai_jaccard", "dai_recall"))
    summary = result["planted"]["summary"]
    assert set(summary) == {"gpt2", "all"}
    assert summary["all"]["grad_x_act"]["spearman"]["mean"] == pytest.approx(
        methods["grad_x_act"]["spearman"]
    )

    real = result["real"]
    assert real["model"] == "tiny:gpt2" and real["isolated"] is False
    assert real["languages"] == ["en", "es", "ja"] and real["facts"] == 2
    records = [json.loads(line) for line in (ROOT / "knlight/resources/quickstart.jsonl").read_text("utf-8")
               .splitlines()]  # fmt: skip
    first_two = sorted({r["uuid"] for r in records})[:2]
    assert real["queries"] == sum(min(2, len(r["queries"])) for r in records if r["uuid"] in first_two)
    assert list(real["methods"]) == METHODS and real["methods"]["ig"]["cheaper_than_ig"] == 1.0
    for method, row in real["methods"].items():
        assert row["s_per_query"] > 0 and row["cpu_s_per_query"] > 0 and row["peak_mb"] >= 0
        assert row["cheaper_than_ig"] > 0 and row["cpu_cheaper_than_ig"] > 0
        if method != "ig":
            assert len(row["spearman_per_layer"]) == 3 and in_unit(row["top5"])  # tiny:gpt2 has 3 layers


def test_exact_ig_against_the_planted_truth_scores_as_the_planted_benchmark_does() -> None:
    """The fidelity benchmark's truth P/R of exact IG equals benchmarks/planted.py's ``dai/global`` on one plant
    (same selection, same carriers), so the two reports can be read side by side."""
    fid = fidelity_module()
    kn = fid.KnOptions(threshold=0.2, p=0.7, adaptive=False)
    ours = fid.planted_run("gpt2", 0, 4, kn, fid.QUICK_PLANT)["methods"]["ig"]["truth"]
    theirs = fid.planted_bench.evaluate(fid.plant("gpt2", 0, **fid.QUICK_PLANT), steps=4, tau=0.2, p=0.7)
    reference = theirs["localisation"]["dai/global"]
    assert (ours["tp"], ours["fp"], ours["fn"]) == (reference["tp"], reference["fp"], reference["fn"])
    assert ours["tp"] > 0
