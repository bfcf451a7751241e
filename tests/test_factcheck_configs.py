"""Every fact-checking config parses (``--print_config``) without loading weights or touching the network."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers
import yaml

import knlight.tasks.base as base
from knlight.cli import main

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
        main([stage, "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["inference_mode"] is False
    assert printed["model"]["class_path"] == "knlight.tasks.factcheck.FactCheckModule"
    assert printed["data"]["class_path"] == "knlight.tasks.factcheck.FactCheckDataModule"
    assert printed["model"]["init_args"]["t"] == 0.7 and printed["model"]["init_args"]["top_k"] == 20
