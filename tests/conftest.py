"""Shared test helpers: repository paths and small, isolated overrides for CLI runs."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
REQUIRE_ORACLES = os.environ.get("KNLIGHT_REQUIRE_ORACLES") == "1"
"""Set by scripts/test (hence CI): an oracle or real-weight package that is missing fails instead of skipping."""


def oracle(module: str) -> Any:
    """Import an independent oracle (captum, EleutherAI's knowledge_neurons, real weights).

    Skipped when absent, unless ``KNLIGHT_REQUIRE_ORACLES=1`` (scripts/test, CI): then a missing oracle fails,
    so the checks against it cannot vanish silently.
    """
    if REQUIRE_ORACLES:
        try:
            return importlib.import_module(module)
        except ImportError as error:
            pytest.fail(f"oracle {module!r} is required (KNLIGHT_REQUIRE_ORACLES=1) but missing: {error}")
    return pytest.importorskip(module)


FIXTURE = REPO / "tests" / "fixtures" / "rml_small.jsonl"
TINY_CONFIG = REPO / "configs" / "tiny" / "localize.yaml"


def small_overrides(root: Path) -> list[str]:
    """CLI overrides that keep a tiny-config run small (1 fact, 14 items, 4 IG steps) and under ``root``."""
    return [
        "--trainer.logger.init_args.save_dir", str(root / "runs"),
        "--trainer.enable_progress_bar", "false",
        "--data.init_args.path", str(FIXTURE),
        "--data.init_args.max_facts", "1",
        "--data.init_args.batch_size", "4",
        "--model.init_args.ig.steps", "4",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_args() -> Callable[[Path], list[str]]:
    """``tiny_args(root)``: the predict command line of the tiny config, small and writing under ``root``."""
    return lambda root: ["predict", "--config", str(TINY_CONFIG), *small_overrides(root)]


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Run torch on one thread for a test module: tiny models get no speed-up from more threads, and on a busy
    shared CPU extra threads slow them down many times over (measured: ~15x on 2 shared cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def print_config(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, argv: list[str]) -> dict:
    """Run ``knlight <argv> --print_config`` with every weight/config load forbidden; return the printed config."""
    import transformers
    import yaml

    import knlight.tasks.base as base
    from knlight.cli import main

    def forbidden(*args, **kwargs):
        raise AssertionError(f"parsing a config must not load models or configs: {args}")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(base, "load_lm", forbidden)
    monkeypatch.setattr(base, "model_kind", forbidden)
    for auto in (
        transformers.AutoConfig,
        transformers.AutoModelForCausalLM,
        transformers.AutoModelForMaskedLM,
    ):
        monkeypatch.setattr(auto, "from_pretrained", forbidden)
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--print_config"])
    assert exit_info.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def run_knlight_ddp(args: list[str], cwd: Path, timeout: int = 600) -> None:
    """Run ``python -m knlight <args>`` as a real 2-process CPU DDP job (one thread each); fail with its stderr."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "knlight", *args, "--trainer.devices", "2", "--trainer.strategy", "ddp"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
