"""Every shipped config parses (``--print_config``) without loading any weights or touching the network."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from conftest import print_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Partial files are composed after the files they extend: --config <base> ... --config <file>.
COMPOSE_WITH = {
    "localize": [CONFIGS / "trainer" / "localize.yaml"],
    "gemma/localize.yaml": [CONFIGS / "trainer" / "localize.yaml", CONFIGS / "localize" / "gemma3-270m.yaml"],
    "gemma/localize-amig.yaml": [
        CONFIGS / "trainer" / "localize.yaml",
        CONFIGS / "localize" / "gemma3-270m.yaml",
        CONFIGS / "gemma" / "localize.yaml",
    ],
    "gemma/intervene.yaml": [CONFIGS / "intervene" / "gemma3-270m.yaml"],
    "gemma/edit.yaml": [CONFIGS / "edit" / "gemma3-270m.yaml"],
    "gemma/factcheck.yaml": [CONFIGS / "factcheck" / "gemma3-270m.yaml"],
    # issue 18: the larger Gemma set and SmolLM2 (SmolLM2 reuses the Gemma base configs with the model swapped)
    "smollm2/localize.yaml": [
        CONFIGS / "trainer" / "localize.yaml",
        CONFIGS / "localize" / "smollm2-135m.yaml",
    ],
    "smollm2/localize-amig.yaml": [
        CONFIGS / "trainer" / "localize.yaml",
        CONFIGS / "localize" / "smollm2-135m.yaml",
        CONFIGS / "smollm2" / "localize.yaml",
    ],
    "smollm2/intervene.yaml": [CONFIGS / "intervene" / "gemma3-270m.yaml"],
    "smollm2/edit.yaml": [CONFIGS / "edit" / "gemma3-270m.yaml"],
    "smollm2/factcheck.yaml": [CONFIGS / "factcheck" / "gemma3-270m.yaml"],
    "gemma-large/localize.yaml": [
        CONFIGS / "trainer" / "localize.yaml",
        CONFIGS / "localize" / "gemma3-270m.yaml",
    ],
    "gemma-large/localize-amig.yaml": [
        CONFIGS / "trainer" / "localize.yaml",
        CONFIGS / "localize" / "gemma3-270m.yaml",
        CONFIGS / "gemma-large" / "localize.yaml",
    ],
    "gemma-large/localize-amig-edits.yaml": [
        CONFIGS / "trainer" / "localize.yaml",
        CONFIGS / "localize" / "gemma3-270m.yaml",
        CONFIGS / "gemma-large" / "localize.yaml",
        CONFIGS / "gemma-large" / "localize-amig.yaml",
    ],
    "gemma-large/intervene.yaml": [CONFIGS / "intervene" / "gemma3-270m.yaml"],
    "gemma-large/edit.yaml": [CONFIGS / "edit" / "gemma3-270m.yaml"],
    "gemma-large/enhance.yaml": [CONFIGS / "edit" / "enhance-gemma3-270m.yaml"],
    "gemma-large/inject.yaml": [CONFIGS / "edit" / "inject-gemma3-270m.yaml"],
    "gemma-large/factcheck.yaml": [CONFIGS / "factcheck" / "gemma3-270m.yaml"],
}
ALL = sorted(CONFIGS.rglob("*.yaml"))
# The subcommand each task runs under.
SUBCOMMANDS = {
    "AttributionModule": "predict",
    "EditingModule": "fit",
    "InterventionModule": "test",
    "FactCheckModule": "test",
}


def compose_chain(config: Path) -> list[Path]:
    rel = str(config.relative_to(CONFIGS))
    return [*COMPOSE_WITH.get(rel, COMPOSE_WITH.get(config.parent.name, [])), config]


def task_of(chain: list[Path]) -> str:
    """The task class named by the last file of the chain that names one (trainer files: attribution)."""
    for path in reversed(chain):
        class_path = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("class_path")
        if class_path:
            return class_path.rsplit(".", 1)[-1]
    return "AttributionModule"


def test_the_expected_configs_are_shipped() -> None:
    names = {str(p.relative_to(CONFIGS)) for p in ALL}
    assert {"tiny/localize.yaml", "trainer/localize.yaml", "quickstart.yaml"} <= names
    assert {f"localize/{m}.yaml" for m in ("mbert", "mgpt", "llama", "gemma3-270m")} <= names
    assert {"tiny/edit.yaml", "tiny/intervene.yaml", "tiny/factcheck.yaml"} <= names


@pytest.mark.parametrize("config", ALL, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_config_parses_without_loading_weights(
    config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    chain = compose_chain(config)
    task = task_of(chain)
    argv = [SUBCOMMANDS[task], *[arg for path in chain for arg in ("--config", str(path))]]
    printed = print_config(monkeypatch, capsys, argv)
    assert printed["trainer"]["inference_mode"] is False
    if config.parent.name == "trainer":
        return
    assert printed["model"]["class_path"].endswith(task)
    assert printed["data"]["class_path"].endswith("DataModule")
    if task == "AttributionModule":
        writers = [
            c for c in printed["trainer"]["callbacks"] if c["class_path"].endswith("AttributionWriter")
        ]
        assert printed["trainer"]["callbacks"][-1] == writers[0]  # last, so CLI overrides reach it
