"""Every fact-checking config parses (``--print_config``) without loading weights or touching the network."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import print_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FACTCHECK = [CONFIGS / "tiny" / "factcheck.yaml", *sorted((CONFIGS / "factcheck").glob("*.yaml"))]


def test_the_expected_configs_are_shipped() -> None:
    names = {p.name for p in FACTCHECK}
    assert {"factcheck.yaml", "planted.yaml", "mgpt.yaml", "mbert.yaml", "gemma3-270m.yaml"} <= names


@pytest.mark.parametrize("config", FACTCHECK, ids=lambda p: str(p.relative_to(CONFIGS)))
@pytest.mark.parametrize("stage", ["validate", "test"])
def test_config_parses_without_loading_weights(
    config: Path, stage: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    printed = print_config(monkeypatch, capsys, [stage, "--config", str(config)])
    assert printed["trainer"]["inference_mode"] is False
    assert printed["model"]["class_path"] == "knlight.tasks.factcheck.FactCheckModule"
    assert printed["data"]["class_path"] == "knlight.tasks.factcheck.FactCheckDataModule"
    assert printed["model"]["init_args"]["t"] == 0.7 and printed["model"]["init_args"]["top_k"] == 20
