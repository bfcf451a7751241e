"""Every shipped config parses (``--print_config``) without loading any weights or touching the network."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import print_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Per-model files are composed with the shared trainer file: --config <trainer> --config <model>.
COMPOSE_WITH = {"localize": [CONFIGS / "trainer" / "localize.yaml"]}
ALL = sorted(CONFIGS.rglob("*.yaml"))


def test_the_expected_configs_are_shipped() -> None:
    names = {str(p.relative_to(CONFIGS)) for p in ALL}
    assert {"tiny/localize.yaml", "trainer/localize.yaml"} <= names
    assert {f"localize/{m}.yaml" for m in ("mbert", "mgpt", "llama", "gemma3-270m")} <= names


# The subcommand and task each config is for: by file (tiny/*) or by directory.
TASKS = {
    "localize": ("predict", "AttributionModule"),
    "trainer": ("predict", "AttributionModule"),
    "quickstart": ("predict", "AttributionModule"),
    "edit": ("fit", "EditingModule"),
    "intervene": ("test", "InterventionModule"),
    "factcheck": ("test", "FactCheckModule"),
}


def task_of(config: Path) -> tuple[str, str]:
    key = config.stem if config.parent.name in ("tiny", "configs") else config.parent.name
    return TASKS[key]


@pytest.mark.parametrize("config", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_parses_without_loading_weights(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    subcommand, task = task_of(config)
    configs = [*COMPOSE_WITH.get(config.parent.name, []), config]
    printed = print_config(
        monkeypatch, capsys, [subcommand, *[a for c in configs for a in ("--config", str(c))]]
    )
    assert printed["trainer"]["inference_mode"] is False
    if config.parent.name == "trainer":
        return
    assert printed["model"]["class_path"].endswith(task)
    assert (
        "RMLLamaDataModule" in printed["data"]["class_path"] or "DataModule" in printed["data"]["class_path"]
    )
    if task == "AttributionModule":
        writers = [
            c for c in printed["trainer"]["callbacks"] if c["class_path"].endswith("AttributionWriter")
        ]
        assert printed["trainer"]["callbacks"][-1] == writers[0]  # last, so CLI overrides reach it
