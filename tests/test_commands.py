"""One ``knlight`` program: the LightningCLI subcommands and knlight's own (select, summary, data build), each
documented by ``--help`` and configurable with ``--config``; selection at the end of ``knlight predict``."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from knlight.cli import main
from knlight.selection.summary import summarize

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "rml_small.jsonl"
LOCALIZE = REPO / "configs" / "tiny" / "localize.yaml"


def help_text(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--help"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


def test_help_lists_every_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(capsys)
    for command in ("fit", "validate", "test", "predict", "select", "summary", "data"):
        assert f"    {command} " in text, command


def test_each_command_documents_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(capsys, "select")
    assert "--attributions" in text and "--dkn.t_low" in text and "--lm.help" in text and "--config" in text
    assert "relative" in text  # the attribute docstrings of the option blocks are shown (dkn.t_low's)
    text = help_text(capsys, "data", "build", "mpararel")
    assert "--root" in text and "--languages" in text and "--model_kind" in text
    assert "--attributions" in help_text(capsys, "summary") or "attributions" in help_text(capsys, "summary")
    text = help_text(capsys, "predict", "--model.help", "knlight.tasks.AttributionModule")
    assert "--model.ig.steps" in text and "Number of quadrature nodes" in text and "--model.lm.model" in text


@pytest.fixture(scope="module")
def predicted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny predict run with SelectNeurons at the end (dense scores for the uncertainty-aware set)."""
    root = tmp_path_factory.mktemp("predict")
    main([
        "predict", "--config", str(LOCALIZE), "--data.init_args.path", str(FIXTURE),
        "--trainer.enable_progress_bar", "false", "--model.init_args.ig.steps", "4",
        "--model.init_args.return_scores", "true", "--trainer.callbacks.init_args.save_scores", "true",
        "--trainer.callbacks.init_args.output_dir", str(root / "attributions"),
        "--trainer.callbacks+=knlight.callbacks.SelectNeurons",
        "--trainer.callbacks.init_args.output", str(root / "at-the-end.json"),
        "--trainer.callbacks.init_args.likn.min_languages", "2",
        "--trainer.callbacks.init_args.uncertainty.enabled", "true",
        "--trainer.callbacks.init_args.dkn.enabled", "true",
        "--trainer.logger.init_args.save_dir", str(root / "runs"),
    ])  # fmt: skip
    return root


def test_selection_at_the_end_of_predict_equals_knlight_select(predicted: Path, tmp_path: Path) -> None:
    settings = tmp_path / "select.yaml"  # the same options, from a config file this time
    settings.write_text(yaml.safe_dump({"likn": {"min_languages": 2}, "uncertainty": {"enabled": True},
                                        "dkn": {"enabled": True}}))  # fmt: skip
    main(["select", "--config", str(settings), "--attributions", str(predicted / "attributions"),
          "--output", str(tmp_path / "afterwards.json")])  # fmt: skip
    end = (predicted / "at-the-end.json").read_text(encoding="utf-8")
    after = (tmp_path / "afterwards.json").read_text(encoding="utf-8")
    assert '"degenerate"' in end and '"uncertainty"' in end
    assert end.replace(str(predicted / "attributions"), "X") == after.replace(
        str(predicted / "attributions"), "X"
    )


def test_summary_command_prints_the_summary(predicted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["summary", str(predicted / "attributions")])
    printed = capsys.readouterr().out
    assert printed.strip() == summarize(predicted / "attributions").strip()
    assert "language-independent:" in printed


def test_data_build_command_writes_records(tmp_path: Path) -> None:
    mpararel = REPO.parent / "shared" / "data" / "mpararel"
    if not mpararel.is_dir():
        pytest.skip(f"real data not found at {mpararel}")
    out = tmp_path / "records.jsonl"
    main(["data", "build", "mpararel", "--root", str(mpararel), "--languages", "[en,de]", "--relations", "[P36]",
          "--max_facts_per_relation", "3", "--output", str(out)])  # fmt: skip
    assert len(out.read_text(encoding="utf-8").splitlines()) == 6  # 3 facts x 2 languages


def test_select_neurons_callback_takes_every_option_block_of_knlight_select() -> None:
    """The end-of-predict selection is configurable like `knlight select` (no option block only in one of them)."""
    import dataclasses
    import inspect

    from knlight.callbacks.select import SelectNeurons
    from knlight.selection.run import run_selection

    def blocks(function: object) -> set[str]:
        parameters = inspect.signature(function).parameters.values()  # type: ignore[arg-type]
        return {p.name for p in parameters if dataclasses.is_dataclass(p.default)}

    assert blocks(run_selection) - {"lm"} == blocks(SelectNeurons.__init__)
    assert {"known", "carriers", "specificity", "consistency", "lape"} <= blocks(SelectNeurons.__init__)
