"""Fact-checking under DDP with 2 CPU processes (CLI in a subprocess) == one process, despite padding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_knlight_ddp

from knlight.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny" / "factcheck.yaml"
FIXTURE = REPO / "tests" / "fixtures" / "rml_small.jsonl"


def args(root: Path) -> list[str]:
    return ["test", "--config", str(CONFIG), "--trainer.logger.init_args.save_dir", str(root / "runs"),
            "--data.init_args.path", str(FIXTURE)]  # fmt: skip


def out(root: Path) -> Path:
    (version,) = (root / "runs" / "tiny-factcheck").glob("version_*")
    return version / "factcheck" / "test"


def test_ddp_two_processes_equal_one_process(tmp_path: Path) -> None:
    assert torch.get_num_threads() == 1  # as each DDP worker below: same kernels, same bits
    main(args(tmp_path / "single"))
    run_knlight_ddp(args(tmp_path / "ddp"), cwd=tmp_path)

    single = json.loads((out(tmp_path / "single") / "results.json").read_text("utf-8"))
    ddp = json.loads((out(tmp_path / "ddp") / "results.json").read_text("utf-8"))
    # 9 test claims on 2 processes: DistributedSampler serves 10 rows (one claim twice), counted once.
    assert single["counts"]["rows_received"] == 9 and single["counts"]["world_size"] == 1
    assert ddp["counts"]["rows_received"] == 10 and ddp["counts"]["world_size"] == 2
    for doc in (single, ddp):
        doc["counts"].pop("rows_received"), doc["counts"].pop("world_size")
        doc["settings"] = None
    assert ddp == single  # same claims, relation sets (sharded DKN search), LR fits, thresholds and tables
    assert single["counts"]["claims"] == 9
    claims_single = (out(tmp_path / "single") / "claims.csv").read_bytes()
    assert (out(tmp_path / "ddp") / "claims.csv").read_bytes() == claims_single
    assert len(claims_single.splitlines()) == 1 + 9
