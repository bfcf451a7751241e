"""A run killed (SIGKILL) mid-predict resumes from its shards to the same file as an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from knlight.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

OUT = Path("runs", "tiny-localize", "attributions")
MORE = ["--data.init_args.max_facts", "2", "--data.init_args.batch_size", "2"]  # 28 items, 14 batches


def test_sigkill_then_resume(tmp_path: Path, tiny_args: Callable[[Path], list[str]]) -> None:
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(
        [sys.executable, "-m", "knlight", *tiny_args(killed), *MORE],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    shards = killed / OUT / "shards"
    deadline = time.monotonic() + 240
    while not list(shards.glob("*.jsonl")) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    written = list(shards.glob("*.jsonl"))
    assert written and not (killed / OUT / "attributions.jsonl").exists()  # killed before the end
    done_before = sum(len(p.read_text("utf-8").splitlines()) for p in written)
    assert done_before < 28

    main([*tiny_args(killed), *MORE])  # resume
    summary = json.loads((killed / OUT / "summary.json").read_text("utf-8"))
    assert summary["resumed"] == done_before and summary["computed"] == 28 - done_before

    main([*tiny_args(tmp_path / "whole"), *MORE])
    whole = (tmp_path / "whole" / OUT / "attributions.jsonl").read_bytes()
    assert (killed / OUT / "attributions.jsonl").read_bytes() == whole
    assert len(whole.splitlines()) == 28
