"""DDP with 2 CPU processes (real `ddp` strategy, CLI in a subprocess): the same tables as one process.

The records file has an odd number of items, so DistributedSampler pads one rank with a duplicate item that
the metric must remove before reducing. Tables are compared byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_knlight_ddp

from knlight.cli import main

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny" / "intervene.yaml"
TABLES = ("intervention", "success_rate", "cross_lingual", "jaccard", "facts", "layers")


def odd_records(path: Path) -> Path:
    """The fixture minus one query of the first record: 27 items for the 2 facts kept below."""
    lines = (REPO / "tests" / "fixtures" / "rml_small.jsonl").read_text("utf-8").splitlines()
    first = json.loads(lines[0])
    first["queries"] = [q for q in first["queries"] if not q.startswith("[Y]")][:-1]
    path.write_text("\n".join([json.dumps(first, ensure_ascii=False), *lines[1:]]) + "\n", "utf-8")
    return path


def args(root: Path, records: Path) -> list[str]:
    return [
        "test", "--config", str(CONFIG),
        "--trainer.logger.init_args.save_dir", str(root / "runs"),
        "--trainer.enable_progress_bar", "false",
        "--data.init_args.path", str(records),
        "--data.init_args.max_facts", "2",
        "--data.init_args.batch_size", "4",
        "--model.init_args.unrelated_per_query", "2",
        "--model.init_args.output_dir", str(root / "out"),
    ]  # fmt: skip


def test_ddp_two_processes_write_the_same_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)  # the config's neuron files are relative to the repository root
    records = odd_records(tmp_path / "odd.jsonl")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each DDP worker below: same kernels, same bits
    try:
        main(args(tmp_path / "single", records))
    finally:
        torch.set_num_threads(threads)

    ddp = tmp_path / "ddp"
    run_knlight_ddp(args(ddp, records), cwd=REPO)

    for name in [*(f"{t}.csv" for t in TABLES), "intervention.json"]:
        single = (tmp_path / "single" / "out" / name).read_bytes()
        assert (ddp / "out" / name).read_bytes() == single, name
    summary = json.loads((ddp / "out" / "summary.json").read_text("utf-8"))
    assert summary["world_size"] == 2 and summary["items"] == 27  # the padded duplicate was removed
    single_summary = json.loads((tmp_path / "single" / "out" / "summary.json").read_text("utf-8"))
    assert single_summary["items"] == 27 and single_summary["world_size"] == 1
