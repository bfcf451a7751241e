"""Every shipped config parses (``--print_config``) without loading any weights or touching the network."""

from __future__ import annotations

from pathlib import Path

import pytest
import transformers
import yaml

import knlight.tasks.base as base
from knlight.cli import main

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
    subcommand, task = task_of(config)
    configs = [*COMPOSE_WITH.get(config.parent.name, []), config]
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, *[arg for c in configs for arg in ("--config", str(c))], "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["inference_mode"] is False
    if config.parent.name == "trainer":
        return
    assert printed["model"]["class_path"].endswith(task)
    assert "RMLLamaDataModule" in printed["data"]["class_path"] or "DataModule" in printed["data"]["class_path"]
    if task == "AttributionModule":
        writers = [
            c for c in printed["trainer"]["callbacks"] if c["class_path"].endswith("AttributionWriter")
        ]
        assert printed["trainer"]["callbacks"][-1] == writers[0]  # last, so CLI overrides reach it
