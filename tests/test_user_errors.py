"""Bad input tried as a user would: runs that would measure nothing, dropped queries, undefined metrics,
inputs longer than the model, mistyped model names, and how the ``knlight`` command reports such errors."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from knlight import load_lm
from knlight.cli import main
from knlight.data import DataError
from knlight.data.datamodule import RMLLamaDataModule
from knlight.errors import ConfigError, KnlightError
from knlight.lm import ModelNotFoundError
from knlight.lm.prompts import QueryError
from knlight.metrics.factcheck import binary_metrics, results_table
from knlight.neurons.neuron_file import read_neuron_file, write_neuron_file

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "rml_small.jsonl"
INTERVENE = REPO / "configs" / "tiny" / "intervene.yaml"
LOCALIZE = REPO / "configs" / "tiny" / "localize.yaml"
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture
def in_repo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.chdir(REPO)  # the tiny configs' paths are relative to the repository root
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield


def intervene_args(root: Path, *extra: str) -> list[str]:
    return [
        "test", "--config", str(INTERVENE),
        "--trainer.logger.init_args.save_dir", str(root / "runs"),
        "--trainer.enable_progress_bar", "false",
        "--model.init_args.unrelated_per_query", "1",
        "--model.init_args.output_dir", str(root / "out"),
        *extra,
    ]  # fmt: skip


def test_a_neuron_file_sharing_no_fact_with_the_data_is_refused(tmp_path: Path, in_repo: None) -> None:
    neurons = read_neuron_file(REPO / "configs" / "tiny" / "neurons" / "dai.json")
    neurons.facts = {f"other:{uuid}": fact for uuid, fact in neurons.facts.items()}
    other = write_neuron_file(tmp_path / "elsewhere.json", neurons)
    methods = json.dumps({"dai": {"neurons": str(other)}})
    with pytest.raises(ConfigError, match=r"no tested fact has neurons.*elsewhere\.json.*rml_small\.jsonl"):
        main(intervene_args(tmp_path, "--model.init_args.methods", methods))
    assert not (tmp_path / "out").exists()  # no empty tables pretend to be results


def test_an_empty_test_split_is_refused(tmp_path: Path, in_repo: None) -> None:
    with pytest.raises(DataError, match=r"test split is empty.*data\.init_args\.split_fractions"):
        main(intervene_args(tmp_path, "--data.init_args.split_fractions", "[1.0, 0.0, 0.0]"))
    assert not (tmp_path / "out").exists()


def test_queries_a_causal_model_cannot_use_are_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()[:2]]
    records[1]["queries"] = [q for q in records[1]["queries"] if q.startswith("[Y]")] or ["[Y] ist hier"]
    path = tmp_path / "records.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="knlight.data.datamodule"):
        data = RMLLamaDataModule(str(path), model_kind="causal")
        data.setup("predict")
    dropped = sum(q.lstrip().startswith("[Y]") for r in records for q in r["queries"])
    assert f"{dropped} queries dropped for a causal model" in caplog.text
    assert (
        f"1 records lost every query (e.g. uuid={records[1]['uuid']} language={records[1]['language']})"
        in (caplog.text)
    )
    assert {item["language"] for item in data.items("all")} == {records[0]["language"]}


def test_metrics_without_false_claims_are_undefined_not_zero() -> None:
    labels = torch.tensor([0, 0, 0])  # every claim true: no positive ("the claim is false")
    metrics = binary_metrics(torch.tensor([0.1, 0.9, 0.2]), labels, threshold=0.5)
    assert math.isnan(metrics["recall"]) and math.isnan(metrics["f1"]) and math.isnan(metrics["auroc"])
    assert metrics["precision"] == 0.0 and metrics["fp"] == 1  # one true claim flagged: precision is defined
    assert "no false claims" in metrics["undefined"]
    rows = results_table(
        "test",
        {"prob": torch.tensor([0.1, 0.9, 0.8, 0.2])},
        torch.tensor([0, 1, 0, 0]),
        {"prob": 0.5},
        {"language": ["en", "en", "de", "de"]},
    )
    by_group = {row["group"]: row for row in rows}
    assert by_group["en"]["f1"] == 1.0 and by_group["en"]["undefined"] == ""
    assert math.isnan(by_group["de"]["f1"]) and "no false claims" in by_group["de"]["undefined"]


def test_a_query_longer_than_the_model_allows_names_the_item(tmp_path: Path, in_repo: None) -> None:
    lm = load_lm("tiny:gpt2")
    assert lm.max_positions == 128
    long_query = "the capital of " + " ".join(["Oxfordshire"] * 150) + " is [Y]"
    with pytest.raises(QueryError, match="takes at most 128 positions"):
        lm.encode(long_query, "Oxford")
    record = json.loads(FIXTURE.read_text(encoding="utf-8").splitlines()[3])
    record["queries"] = [long_query]
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps(record) + "\n", encoding="utf-8")
    args = ["predict", "--config", str(LOCALIZE), "--data.init_args.path", str(path),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false",
            "--model.init_args.ig.steps", "2"]  # fmt: skip
    with pytest.raises(QueryError, match=rf"uuid='{record['uuid']}' language='en' query_id=0.*at most 128"):
        main(args)


def test_a_mistyped_packaged_model_name_suggests_the_right_one() -> None:
    with pytest.raises(
        ModelNotFoundError, match=r"unknown model name 'gemma3-27Om'; did you mean 'gemma3-270m'\?"
    ):
        load_lm("gemma3-27Om")
    with pytest.raises(ModelNotFoundError, match=r"did you mean tiny:gpt2\?"):
        load_lm("tiny:gtp2")


def test_an_unloadable_model_name_is_one_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never reach for the network in a test
    with pytest.raises(
        ModelNotFoundError, match=r"cannot load model 'no-such-org/no-such-model'.*Pass a local path"
    ):
        load_lm("no-such-org/no-such-model")


def _knlight(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "knlight", *args],
        cwd=cwd,
        env=OFFLINE,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--model.init_args.lm.model", "gemma3-27Om"], "did you mean 'gemma3-270m'?"),
        (["--data.init_args.path", "nowhere/facts.jsonl"], "nowhere/facts.jsonl"),
        (["--model.init_args.unrelated_per_query", "-1"], "model.init_args.unrelated_per_query must be >= 0"),
    ],
)
def test_the_command_prints_a_user_error_as_one_line(
    tmp_path: Path, override: list[str], message: str
) -> None:
    done = _knlight("test", "--config", str(INTERVENE), "--trainer.logger.init_args.save_dir", str(tmp_path),
                    *override, cwd=REPO)  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("knlight: error:")]
    assert len(errors) == 1 and message in errors[0]


def test_every_user_error_class_is_a_knlight_error() -> None:
    from knlight.errors import DataError as DataErr
    from knlight.lm.real import ModelNotAvailableError
    from knlight.lm.sites import UnsupportedModelError
    from knlight.lm.upstream import UpstreamError
    from knlight.neurons.neuron_file import NeuronFileError

    for error in (DataErr, QueryError, NeuronFileError, UnsupportedModelError, UpstreamError,
                  ModelNotAvailableError, ModelNotFoundError, ConfigError):  # fmt: skip
        assert issubclass(error, KnlightError), error
