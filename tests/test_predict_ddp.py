"""DDP with 2 CPU processes (real `ddp` strategy, CLI in a subprocess) == one process, byte for byte."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import run_knlight_ddp

from knlight.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

OUT = Path("runs", "tiny-localize", "attributions")


def test_ddp_two_processes_equal_one_process(tmp_path: Path, tiny_args: Callable[[Path], list[str]]) -> None:
    assert torch.get_num_threads() == 1  # as each DDP worker below: same kernels, same bits
    main(tiny_args(tmp_path / "single"))

    ddp = tmp_path / "ddp"
    run_knlight_ddp(
        [*tiny_args(ddp), "--trainer.callbacks.init_args.keep_shards", "true"], cwd=tmp_path, timeout=300
    )

    single_file = (tmp_path / "single" / OUT / "attributions.jsonl").read_bytes()
    assert (ddp / OUT / "attributions.jsonl").read_bytes() == single_file
    assert len(single_file.splitlines()) == 14
    summary = json.loads((ddp / OUT / "summary.json").read_text("utf-8"))
    assert summary["world_size"] == 2 and summary["computed"] == 14
    ranks = {p.name.split("-")[1] for p in (ddp / OUT / "shards").glob("*.jsonl")}
    assert ranks == {"r0000", "r0001"}  # both processes did part of the work
