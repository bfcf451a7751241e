"""DDP with 2 CPU processes (real `ddp` strategy, CLI in a subprocess) == one process, byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from knlight.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

OUT = Path("runs", "tiny-localize", "attributions")


def test_ddp_two_processes_equal_one_process(tmp_path: Path, tiny_args: Callable[[Path], list[str]]) -> None:
    assert torch.get_num_threads() == 1  # as each DDP worker below: same kernels, same bits
    main(tiny_args(tmp_path / "single"))

    ddp = tmp_path / "ddp"
    args = [*tiny_args(ddp), "--trainer.devices", "2", "--trainer.strategy", "ddp",
            "--trainer.callbacks.init_args.keep_shards", "true"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "knlight", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    single_file = (tmp_path / "single" / OUT / "attributions.jsonl").read_bytes()
    assert (ddp / OUT / "attributions.jsonl").read_bytes() == single_file
    assert len(single_file.splitlines()) == 14
    summary = json.loads((ddp / OUT / "summary.json").read_text("utf-8"))
    assert summary["world_size"] == 2 and summary["computed"] == 14
    ranks = {p.name.split("-")[1] for p in (ddp / OUT / "shards").glob("*.jsonl")}
    assert ranks == {"r0000", "r0001"}  # both processes did part of the work
