"""The intervention configs parse (`knlight test --print_config`) without weights; options are documented."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import print_config

from knlight.cli import main

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
INTERVENE = [CONFIGS / "tiny" / "intervene.yaml", *sorted((CONFIGS / "intervene").glob("*.yaml"))]


def test_the_intervention_configs_are_shipped() -> None:
    assert {p.stem for p in INTERVENE} >= {"intervene", "mbert", "mgpt", "gemma3-270m"}


@pytest.mark.parametrize("config", INTERVENE, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_parses_without_loading_weights(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    printed = print_config(monkeypatch, capsys, ["test", "--config", str(config)])
    assert printed["model"]["class_path"] == "knlight.tasks.intervention.InterventionModule"
    methods = printed["model"]["init_args"]["methods"]
    assert methods and all(set(m) == {"neurons", "kind"} for m in methods.values())
    assert printed["data"]["init_args"]["split_fractions"] == [0.0, 0.0, 1.0]
    callbacks = [c["class_path"] for c in printed["trainer"]["callbacks"]]
    assert callbacks == ["knlight.callbacks.intervention_figures.InterventionFigures"]


def test_module_options_are_documented(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["test", "--model.help", "knlight.tasks.intervention.InterventionModule"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in (
        "--model.unrelated_per_query",
        "Queries of other facts (same language) measured",
        "--model.random_control",
        "same count per layer, seeded",
        "--model.methods",
    ):
        assert phrase in text
