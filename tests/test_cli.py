"""The `knlight` command line and the attribution task on bad input: clear errors, OOM split-and-retry."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import knlight.tasks.attribution as attribution_task
from knlight.cli import main
from knlight.errors import DataError
from knlight.lm.options import LMOptions
from knlight.lm.prompts import QueryError
from knlight.neurons.ig import IGOptions
from knlight.tasks import AttributionModule

pytestmark = pytest.mark.usefixtures("one_thread")


def item(query: str, answer: str = "Paris", query_id: int = 0, uuid: str = "P36:Q142:Q90") -> dict:
    return {"uuid": uuid, "language": "en", "relation": "P36", "query_id": query_id, "query": query,
            "answer": answer, "subject": "France"}  # fmt: skip


@pytest.fixture(scope="module")
def gpt2_task() -> AttributionModule:
    task = AttributionModule(LMOptions("tiny:gpt2"), IGOptions(steps=2))
    task.configure_model()
    return task


def test_unknown_model_class_is_named(tmp_path: Path, tiny_args, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*tiny_args(tmp_path), "--model.class_path", "knlight.tasks.Nope"])
    assert exit_info.value.code != 0
    assert "knlight.tasks.Nope" in capsys.readouterr().err


def test_missing_data_file_is_named(tmp_path: Path, tiny_args) -> None:
    missing = tmp_path / "nowhere" / "facts.jsonl"
    with pytest.raises(DataError, match=r"nowhere/facts\.jsonl"):
        main([*tiny_args(tmp_path), "--data.init_args.path", str(missing)])


def test_record_with_a_query_without_slot_is_named(tmp_path: Path, tiny_args) -> None:
    records = tmp_path / "bad.jsonl"
    record = {"uuid": "P36:Q142:Q90", "relation": "P36", "language": "en", "subject": "France",
              "object": "Paris", "queries": ["The capital of France is Paris."]}  # fmt: skip
    records.write_text(json.dumps(record) + "\n", "utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:1.*The capital of France is Paris"):
        main(
            [
                *tiny_args(tmp_path),
                "--data.init_args.path",
                str(records),
                "--data.init_args.max_facts",
                "null",
            ]
        )


def test_query_error_names_the_item(gpt2_task: AttributionModule) -> None:
    bad = item("The capital of France is Paris.", query_id=3, uuid="P36:bad")
    with pytest.raises(
        QueryError, match=r"uuid='P36:bad' language='en' query_id=3 .*capital of France is Paris\."
    ):
        gpt2_task.predict_step([item("The capital of France is [Y]."), bad])


def test_answer_that_tokenises_to_nothing_names_the_item() -> None:
    task = AttributionModule(LMOptions("tiny:bert"), IGOptions(steps=2))
    task.configure_model()
    with pytest.raises(QueryError, match=r"uuid='P36:Q142:Q90'.*tokenises to nothing"):
        task.predict_step([item("The capital of France is [Y].", answer="\u200b")])


def test_out_of_range_threshold_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match=r"threshold for 'zh-hans' must be in \[0, 1\].*got 2"):
        AttributionModule(LMOptions("tiny:gpt2"), language_thresholds={"en": 0.3, "zh-hans": 2.0})


def test_predict_under_inference_mode_says_how_to_fix(gpt2_task: AttributionModule) -> None:
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"trainer\.inference_mode: false"):
        gpt2_task.predict_step([item("The capital of France is [Y].")])


BATCH = [item(q, a, i) for i, (q, a) in enumerate([
    ("The capital of France is [Y].", "Paris"), ("The capital of Japan is [Y].", "Tokyo"),
    ("Die Hauptstadt von Japan ist [Y].", "Tokio"), ("Albert Einstein was born in [Y].", "Ulm"),
    ("The official language of France is [Y].", "French"),
])]  # fmt: skip


@pytest.mark.parametrize(
    "error", [torch.OutOfMemoryError("CUDA out of memory."), RuntimeError("out of memory")]
)
def test_out_of_memory_splits_the_batch_and_keeps_every_item(
    gpt2_task: AttributionModule, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    error: Exception,
) -> None:  # fmt: skip
    sizes: list[int] = []
    real = attribution_task.attribute_batch

    def small_memory(lm, items, **kwargs):
        sizes.append(len(items))
        if len(items) > 1:
            raise error
        return real(lm, items, **kwargs)

    expected = gpt2_task.predict_step(BATCH)  # micro-batches of 1 (default): never more than 1 item per call
    monkeypatch.setattr(attribution_task, "attribute_batch", small_memory)
    monkeypatch.setattr(gpt2_task, "micro_batch_size", None)  # the whole batch in one call
    with caplog.at_level(logging.WARNING):
        results = gpt2_task.predict_step(BATCH)
    assert sizes == [5, 2, 1, 1, 3, 1, 2, 1, 1]  # halves, recursively
    assert "out of memory on 5 items: retrying as 2 + 3" in caplog.text
    assert [r["query_id"] for r in results] == [0, 1, 2, 3, 4]
    for got, want in zip(results, expected):
        assert got["neurons"] == want["neurons"] and got["prob"] == want["prob"]


def test_out_of_memory_on_a_single_item_raises_naming_it(
    gpt2_task: AttributionModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_memory(lm, items, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory.")

    monkeypatch.setattr(attribution_task, "attribute_batch", no_memory)
    monkeypatch.setattr(gpt2_task, "micro_batch_size", None)
    with pytest.raises(
        torch.OutOfMemoryError, match=r"single item \(uuid='P36:Q142:Q90'.*query_id=0\).*chunk_rows"
    ):
        gpt2_task.predict_step(BATCH[:2])


def test_other_runtime_errors_are_not_retried(
    gpt2_task: AttributionModule, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []

    def broken(lm, items, **kwargs):
        calls.append(len(items))
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(attribution_task, "attribute_batch", broken)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        gpt2_task.predict_step(BATCH[:2])
    assert calls == [1]


def test_masked_model_gets_model_kind_through_the_link(tmp_path: Path, tiny_args: Callable) -> None:
    main(
        [
            *tiny_args(tmp_path),
            "--model.init_args.lm.model",
            "tiny:bert",
            "--data.init_args.languages",
            "[zh-hans]",
        ]
    )
    (hparams,) = (tmp_path / "runs" / "tiny-localize").glob("version_*/hparams.yaml")
    assert "model_kind: masked" in hparams.read_text("utf-8").splitlines()  # computed from the model
    out = tmp_path / "runs" / "tiny-localize" / "attributions" / "attributions.jsonl"
    queries = [json.loads(line)["query"] for line in out.read_text("utf-8").splitlines()]
    assert len(queries) == 4 and any(q.startswith("[Y]") for q in queries)  # a causal model would drop those


def test_help_shows_docstrings(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--model.help", "knlight.tasks.AttributionModule"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo the help's line wrapping
    assert "Global τ: a neuron is selected when its attribution exceeds τ" in text
    assert "--model.language_thresholds" in text and "AMIG used ``{en: 0.3, zh: 0.2}``" in text


def test_named_real_model_kind_is_known_without_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    from knlight.tasks.base import model_kind

    def forbidden(*args, **kwargs):
        raise AssertionError("model_kind must not read a config for a named packaged model")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", forbidden)
    model_kind.cache_clear()
    assert model_kind("gemma3-270m") == "causal"
