"""`knlight predict` with the tiny config, in-process: merged output, wiring, resume, TensorBoard, scores."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import knlight.tasks.attribution as attribution_task
from knlight import attribute_batch, load_lm
from knlight.cli import main
from knlight.data.datamodule import RMLLamaDataModule

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURE = Path(__file__).parent / "fixtures" / "rml_small.jsonl"
OUT = Path("runs", "tiny-localize", "attributions")


def merged(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / OUT / "attributions.jsonl").read_text("utf-8").splitlines()]


def summary(root: Path) -> dict:
    return json.loads((root / OUT / "summary.json").read_text("utf-8"))


@pytest.fixture(scope="module")
def finished(
    one_thread: None, tmp_path_factory: pytest.TempPathFactory, tiny_args: Callable[[Path], list[str]]
) -> Path:
    """One uninterrupted run of the tiny config (shared by the tests of this file)."""
    root = tmp_path_factory.mktemp("finished")
    main(tiny_args(root))
    return root


def test_merged_file_has_every_item_once_sorted(finished: Path) -> None:
    expected = RMLLamaDataModule(str(FIXTURE), max_facts=1, model_kind="causal").items()
    records = merged(finished)
    keys = [(r["uuid"], r["language"], r["query_id"]) for r in records]
    assert keys == sorted({(i["uuid"], i["language"], i["query_id"]) for i in expected})
    assert len(keys) == 14
    assert summary(finished)["per_language"] == {"de": 4, "en": 8, "zh-hans": 2}
    assert all(r["neurons"] and len(r["residual"]) == 3 and len(r["layer_mass"]) == 3 for r in records)


def test_neurons_agree_with_attribute_batch_called_directly(finished: Path) -> None:
    lm = load_lm("tiny:gpt2")
    thresholds = {"en": 0.3, "zh-hans": 0.2}  # configs/tiny/localize.yaml
    for record in merged(finished)[::4]:
        direct = attribute_batch(lm, [(record["query"], record["answer"])], steps=4)
        scores = direct.scores[0]
        tau = thresholds.get(record["language"], 0.2)
        rows, cols = torch.nonzero(scores > tau * scores.max(), as_tuple=True)
        expected = sorted(zip(rows.tolist(), cols.tolist()), key=lambda n: (-float(scores[n]), n))
        assert [(layer, index) for layer, index, _ in record["neurons"]] == expected
        for layer, index, score in record["neurons"]:
            assert score == pytest.approx(float(scores[layer, index]), rel=1e-6)
        assert record["prob"] == pytest.approx(float(direct.prob[0]), rel=1e-6)
        assert record["residual"] == pytest.approx(direct.residual[0].tolist(), rel=1e-5, abs=1e-12)


def test_tensorboard_has_config_throughput_histogram_and_images(finished: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (version,) = (finished / "runs" / "tiny-localize").glob("version_*")
    assert (version / "config.yaml").is_file()
    events = EventAccumulator(str(version), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert {"predict/items_per_s", "predict/items_per_s_total"} <= set(tags["scalars"])
    assert len(events.Scalars("predict/items_per_s")) == 4  # 14 items in batches of 4
    assert {"attribution/selected_neurons", "attribution/layer_mass"} <= set(tags["images"])
    assert events.Images("attribution/selected_neurons")[0].encoded_image_string.startswith(b"\x89PNG")
    assert "attribution/layer_mass" in tags["histograms"]
    (text,) = [t for t in tags["tensors"] if t.startswith("config")]
    config_text = events.Tensors(text)[0].tensor_proto.string_val[0].decode()
    assert "knlight.tasks.AttributionModule" in config_text and "tiny:gpt2" in config_text


class Crash(RuntimeError):
    """Stands in for a killed process."""


def test_resume_after_crash_equals_uninterrupted_run(
    tmp_path: Path, finished: Path, tiny_args: Callable[[Path], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    crash_at: list[int | None] = [
        6
    ]  # items are attributed one at a time: batch 1 dies after 2 of its 4 items

    def counting(lm, items, **kwargs):
        if crash_at[0] is not None and len(calls) == crash_at[0]:
            raise Crash("killed")
        calls.append("x")
        return attribute_batch(lm, items, **kwargs)

    monkeypatch.setattr(attribution_task, "attribute_batch", counting)
    with pytest.raises(Crash):
        main(tiny_args(tmp_path))
    assert not (tmp_path / OUT / "attributions.jsonl").exists()
    shards = sorted((tmp_path / OUT / "shards").glob("*.jsonl"))
    assert [p.name for p in shards] == ["a001-r0000-b000000000.jsonl"]  # only the finished batch is on disk

    calls.clear()
    crash_at[0] = None
    main(tiny_args(tmp_path))
    assert len(calls) == 14 - 4  # the 4 items of the written batch were not recomputed
    assert summary(tmp_path) | {"seconds": 0, "items_per_s": 0} == {
        "items": 14, "computed": 10, "resumed": 4, "per_language": {"de": 4, "en": 8, "zh-hans": 2},
        "seconds": 0, "items_per_s": 0, "world_size": 1, "layers": [0, 1, 2], "method": "ig",
    }  # fmt: skip
    assert (tmp_path / OUT / "attributions.jsonl").read_bytes() == (
        finished / OUT / "attributions.jsonl"
    ).read_bytes()
    assert not (tmp_path / OUT / "shards").exists()  # merged, then cleaned up

    calls.clear()
    main(tiny_args(tmp_path))  # a finished run: nothing left to do, same file
    assert calls == []
    assert (tmp_path / OUT / "attributions.jsonl").read_bytes() == (
        finished / OUT / "attributions.jsonl"
    ).read_bytes()


def test_resume_refuses_results_of_other_settings(
    tmp_path: Path, tiny_args: Callable[[Path], list[str]]
) -> None:
    out = tmp_path / OUT
    out.mkdir(parents=True)
    (out / "attributions.jsonl").write_text('{"uuid":"u","language":"en","query_id":0}\n', "utf-8")
    (out / "run.json").write_text(json.dumps({"task": "knlight.tasks.attribution.AttributionModule",
                                              "hparams": {"steps": 50}, "writer": {}}), "utf-8")  # fmt: skip
    with pytest.raises(RuntimeError, match=r"different settings \(.*hparams\.steps"):
        main(tiny_args(tmp_path))
    with pytest.raises(RuntimeError, match="resume is false"):
        main([*tiny_args(tmp_path), "--trainer.callbacks.init_args.resume", "false"])


def test_save_scores_top_k(tmp_path: Path, tiny_args: Callable[[Path], list[str]]) -> None:
    main([
        *tiny_args(tmp_path),
        "--data.init_args.languages", "[zh-hans]",
        "--model.init_args.return_scores", "true",
        # the writer is the last callback of the config: these set its arguments
        "--trainer.callbacks.init_args.save_scores", "true",
        "--trainer.callbacks.init_args.scores_top_k", "3",
    ])  # fmt: skip
    records = merged(tmp_path)
    assert len(records) == 2
    with safe_open(str(tmp_path / OUT / "scores.safetensors"), framework="pt") as handle:
        assert handle.metadata()["format"] == "top_3"
        for r in records:
            key = json.dumps(
                [r["uuid"], r["language"], r["query_id"]], ensure_ascii=False, separators=(",", ":")
            )
            index, score = handle.get_tensor(f"{key}/index"), handle.get_tensor(f"{key}/score")
            assert index.shape == (3, 2) and torch.all(score[:-1] >= score[1:])
            top = r["neurons"][0]
            assert index[0].tolist() == top[:2] and float(score[0]) == pytest.approx(top[2], rel=1e-6)


def test_corrupt_shard_is_reported(tmp_path: Path, tiny_args: Callable[[Path], list[str]]) -> None:
    shard = tmp_path / OUT / "shards" / "a001-r0000-b000000000.jsonl"
    shard.parent.mkdir(parents=True)
    shard.write_text('{"uuid": "P36:Q23169:Q34217", "lang\n', "utf-8")
    with pytest.raises(RuntimeError, match=r"cannot resume from .*attributions: JSONDecodeError"):
        main(tiny_args(tmp_path))
