"""EditingModule: neuron rules, the training schedule, `knlight fit/test` end to end, modes, bad input."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from knlight import load_lm
from knlight.cli import main
from knlight.data.records import read_records
from knlight.editing.options import EditRequests, EditTraining
from knlight.editing.rules import parse_rule, rule_neurons
from knlight.lm.options import LMOptions
from knlight.neurons.edits import NeuronEdit
from knlight.tasks.editing import EditingModule

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "rml_small.jsonl"
CONFIG = REPO / "configs" / "tiny" / "edit.yaml"
UUIDS = ["P36:Q118903:Q216", "P36:Q23169:Q34217", "P37:Q485207:Q7850", "P37:Q505064:Q1412"]
# tiny:gpt2 (3 layers × 64) is random: the same neurons fire most on every query. These fire on all of them.
FIRING = [[1, 40], [1, 54], [2, 42], [2, 10], [2, 57], [2, 2]]
LI = {uuid: FIRING for uuid in UUIDS}
# Disjoint sets (for sequential editing): facts 0 and 1 split the firing neurons.
DISJOINT = {UUIDS[0]: FIRING[0::2], UUIDS[1]: FIRING[1::2], UUIDS[2]: [[0, 1]], UUIDS[3]: [[0, 2]]}


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread (and the CPUs are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_neurons(path: Path, li: dict[str, list[list[int]]] = LI, d_ff: int = 64) -> Path:
    """A ``knlight-neurons/1`` file for tiny:gpt2 with the given language-independent sets."""
    facts = {
        uuid: {"relation": uuid.split(":")[0], "language_independent": ns,
               "languages": {"en": [*ns, [0, 63]], "de": ns[:1]}}
        for uuid, ns in li.items()
    }  # fmt: skip
    data = {"format": "knlight-neurons/1", "model": "tiny:gpt2", "num_layers": 3, "d_ff": d_ff, "method": {}}
    path.write_text(json.dumps({**data, "facts": facts}), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def neurons(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_neurons(tmp_path_factory.mktemp("neurons") / "neurons.json")


def fit_args(root: Path, neuron_file: Path, *extra: str, command: str = "fit") -> list[str]:
    return [
        command, "--config", str(CONFIG),
        "--trainer.logger.init_args.save_dir", str(root / "runs"),
        "--trainer.enable_progress_bar", "false",
        "--data.init_args.path", str(FIXTURE),
        "--model.init_args.neurons", str(neuron_file),
        "--model.init_args.neuron_rule", "language_independent",
        "--model.init_args.layers", "null",
        "--model.init_args.training.steps", "20",
        *extra,
    ]  # fmt: skip


def run_dir(root: Path, version: int = 0) -> Path:
    return root / "runs" / "tiny-edit" / f"version_{version}"


def table(path: Path) -> dict[tuple[str, str, str, str], float]:
    rows = json.loads(path.read_text(encoding="utf-8"))["rows"]
    return {(r["method"], r["role"], r["measure"], r["language"]): r["value"] for r in rows}


REQUESTS = ("edits", "edit_languages", "edit_queries", "max_edits", "edits_per_group")
TRAINING = ("steps", "trainable", "in_lr_scale", "locality_weight")


def editing_module(**kwargs) -> EditingModule:
    """``EditingModule`` on tiny:gpt2 from flat keyword arguments (grouped into its option blocks here)."""
    requests = {k: kwargs.pop(k) for k in REQUESTS if k in kwargs}
    training = {k: kwargs.pop(k) for k in TRAINING if k in kwargs}
    return EditingModule(LMOptions("tiny:gpt2"), requests=EditRequests(**requests), training=EditTraining(**training),
                         **kwargs)  # fmt: skip


def planned(neuron_file: Path | None, **kwargs) -> EditingModule:
    """A module planned on the fixture without a Trainer."""
    kwargs.setdefault("neurons", None if neuron_file is None else str(neuron_file))
    module = editing_module(**kwargs)
    module.use_records(read_records(str(FIXTURE)))
    module.configure_model()
    return module


# ----------------------------------------------------------------------------------------------------------
# rules and schedule


def test_neuron_rules() -> None:
    entry = {
        "language_independent": [[2, 5], [2, 9], [1, 3]],
        "languages": {"en": [[0, 1]]},
        "uncertainty": [[1, 1]],
    }
    assert rule_neurons("language_independent", entry, uuid="u", d_ff=16, seed=0) == [(1, 3), (2, 5), (2, 9)]
    assert rule_neurons("language:en", entry, uuid="u", d_ff=16, seed=0) == [(0, 1)]
    assert rule_neurons("language:fr", entry, uuid="u", d_ff=16, seed=0) == []
    assert rule_neurons("uncertainty", entry, uuid="u", d_ff=16, seed=0) == [(1, 1)]
    rand = rule_neurons("random", entry, uuid="u", d_ff=16, seed=0)
    assert sorted(layer for layer, _ in rand) == [1, 2, 2]  # same count per layer
    assert not set(rand) & {(1, 3), (2, 5), (2, 9)}  # never a language-independent neuron
    assert rand == rule_neurons("random", entry, uuid="u", d_ff=16, seed=0)  # seeded
    others = [rule_neurons("random", entry, uuid="u", d_ff=16, seed=s) for s in range(1, 6)]
    assert any(o != rand for o in others)
    assert rule_neurons("ffn", entry, uuid="u", d_ff=4, seed=0) == [(1, i) for i in range(4)] + [
        (2, i) for i in range(4)
    ]
    assert rule_neurons("ffn", None, uuid="u", d_ff=2, seed=0, layers=[0]) == [(0, 0), (0, 1)]
    with pytest.raises(ValueError, match="neuron_rule='langauge': choose"):
        parse_rule("langauge")
    with pytest.raises(ValueError, match="needs a neuron file"):
        rule_neurons("random", None, uuid="u", d_ff=4, seed=0)


def test_plan_rows_and_schedule(neurons: Path) -> None:
    module = planned(neurons, edits=[{"uuid": UUIDS[0]}, {"uuid": UUIDS[2], "new_object": "Klingon"}],
                     edit_languages=["en"], edit_queries=2, steps=3)  # fmt: skip
    first, second = module.requests
    assert first.new == {
        "en": "Albuquerque",
        "de": "Albuquerque",
        "zh-hans": "阿尔伯克基",
    }  # first wrong object
    assert first.competitors["de"] == ["Vilnius"] and second.new["zh-hans"] == "Klingon"
    assert module.edit is not None and module.edit.neurons == sorted(map(tuple, FIRING))
    roles = [(r["uuid"], r["language"], r["role"]) for r in module.eval_rows]
    assert roles.count((UUIDS[0], "en", "reliability")) == 2  # edit_queries
    assert roles.count((UUIDS[0], "en", "generality_lang")) == 8 - 2  # 8 causal-usable en queries
    assert roles.count((UUIDS[0], "de", "generality_cross")) == 4
    locality = {r["uuid"] for r in module.eval_rows if r["role"] == "locality"}
    kl = {r["uuid"] for r in module.kl_rows}
    assert len(locality) == len(kl) == 1 and not locality & kl and not (locality | kl) & {UUIDS[0], UUIDS[2]}

    schedule = module.schedule(global_batch=6)  # 4 edit rows: 2 padding rows per global batch
    assert len(schedule) == 3 * 6
    for step in range(3):
        batch = schedule[6 * step : 6 * step + 6]
        real = [r for r in batch if r["weight"] > 0]
        assert len(real) == 4 and sum(r["weight"] for r in batch) == pytest.approx(1.0)
        assert len({(r["uuid"], r["query_id"]) for r in real}) == 4
        assert all(r["loc_query"] for r in real) and all(r["answer"] != r["loc_answer"] for r in real)
    small = module.schedule(global_batch=2)  # fewer slots than rows: random subsets
    assert len(small) == 6 and all(r["weight"] == 0.5 for r in small)


def test_sequential_groups(neurons: Path) -> None:
    module = planned(
        neurons, edits=[{"uuid": u} for u in UUIDS[:3]], edits_per_group=2, steps=2, edit_queries=1
    )
    assert [r.group for r in module.requests] == [0, 0, 1]
    groups = [r["group"] for r in module.schedule(global_batch=4)]
    assert groups == [0] * 8 + [1] * 8  # each group's steps in a block


# ----------------------------------------------------------------------------------------------------------
# end to end


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, neurons: Path) -> Path:
    root = tmp_path_factory.mktemp("fit")
    main(fit_args(root, neurons))
    return root


def test_fit_raises_reliability_and_saves_a_small_edit(fitted: Path) -> None:
    values = table(run_dir(fitted) / "editing_val.json")
    # Random tiny model, multi-token objects: the new object overtakes the old one, P(new) grows 100-fold.
    assert values[("unedited", "reliability", "rank", "all")] == 0.0
    assert values[("edited", "reliability", "rank", "all")] == 1.0
    assert (
        values[("edited", "reliability", "p_new", "all")]
        > 100 * values[("unedited", "reliability", "p_new", "all")]
    )
    assert (
        values[("edited", "reliability", "p_old", "all")]
        < values[("unedited", "reliability", "p_old", "all")]
    )
    assert ("edited", "generality_cross", "rank", "zh-hans") in values
    assert ("edited", "locality", "kl", "all") in values and (
        "direct",
        "reliability",
        "rank",
        "all",
    ) in values
    csv = (run_dir(fitted) / "editing_val.csv").read_text(encoding="utf-8").splitlines()
    assert csv[0] == "method,role,measure,language,value,count" and len(csv) == len(values) + 1

    path = run_dir(fitted) / "edit.safetensors"
    assert path.stat().st_size < 10_000
    edit = NeuronEdit.load(path, load_lm("tiny:gpt2"))
    info = json.loads((run_dir(fitted) / "editing_val.json").read_text(encoding="utf-8"))
    edited = [r["uuid"] for r in info["requests"]]
    assert len(edited) == 2  # configs/tiny/edit.yaml: max_edits 2
    assert edit.neurons == sorted({tuple(n) for u in edited for n in LI[u]})
    assert [f["uuid"] for f in edit.metadata["facts"]] == edited
    assert edit.metadata["model"] == "tiny:gpt2" and edit.metadata["method"].startswith("finetune:edit")
    assert torch.count_nonzero(edit.out_weight) > 0


def test_tensorboard_has_the_editing_scalars(fitted: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir(fitted)), size_guidance={"scalars": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {
        "val/edited/reliability/rank/all",
        "val/unedited/generality_cross/top1/de",
        "train/nll",
    } <= scalars


def test_test_with_the_saved_edit_reproduces_validation(fitted: Path, neurons: Path, tmp_path: Path) -> None:
    saved = run_dir(fitted) / "edit.safetensors"
    main(fit_args(tmp_path, neurons, "--model.init_args.load_edit", str(saved), command="test"))
    val = table(run_dir(fitted) / "editing_val.json")
    test = table(run_dir(tmp_path) / "editing_test.json")
    assert test.keys() == val.keys()
    for key, value in val.items():
        assert test[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


def test_sequential_editing_leaves_other_groups_exactly_alone(tmp_path: Path) -> None:
    from lightning.pytorch import Callback, Trainer

    from knlight.tasks.editing import EditingDataModule

    class Record(Callback):
        def __init__(self) -> None:
            self.seen: list[tuple[int, dict[str, torch.Tensor]]] = []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            state = {k: v.detach().clone() for k, v in module.edit.named_parameters()}
            self.seen.append((batch[0]["group"], state))

    neurons = write_neurons(tmp_path / "disjoint.json", DISJOINT)
    module = editing_module(
        neurons=str(neurons), edits=[{"uuid": UUIDS[0]}, {"uuid": UUIDS[1]}], edits_per_group=1,
        steps=4, optimizer=lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),  # decay must not leak
    )  # fmt: skip
    record = Record()
    trainer = Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
                      default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(module, datamodule=EditingDataModule(str(FIXTURE), batch_size=2, model_kind="causal"))
    assert [g for g, _ in record.seen] == [0] * 4 + [1] * 4
    rows = module.edit.neurons
    own = {g: [k for k, n in enumerate(rows) if list(n) in DISJOINT[UUIDS[g]]] for g in (0, 1)}
    dims = {"in_weight": 1, "in_bias": 1, "out_weight": 0}
    end_of_first = record.seen[3][1]
    for group, state in record.seen:
        for name, dim in dims.items():
            other = state[name].index_select(dim, torch.tensor(own[1 - group]))
            if group == 0:
                assert torch.count_nonzero(other) == 0  # group 1's rows untouched during group 0
            else:  # group 0's rows keep their exact values while group 1 trains
                assert torch.equal(other, end_of_first[name].index_select(dim, torch.tensor(own[0])))
            assert torch.count_nonzero(state[name].index_select(dim, torch.tensor(own[group]))) > 0
    assert (tmp_path / "edit.safetensors").is_file()  # no logger: saved in the default root dir


def test_inject_and_enhance_modes(neurons: Path, tmp_path: Path) -> None:
    main(fit_args(tmp_path / "inject", neurons, "--model.init_args.mode", "inject",
                  "--model.init_args.baselines", "[]"))  # fmt: skip
    values = table(run_dir(tmp_path / "inject") / "editing_val.json")
    info = json.loads((run_dir(tmp_path / "inject") / "editing_val.json").read_text(encoding="utf-8"))
    assert all(r["new"] == r["old"] for r in info["requests"])  # the true objects are taught
    assert all(
        len(c) == 3 for r in info["requests"] for c in r["competitors"].values()
    )  # vs the wrong objects
    assert (
        values[("edited", "reliability", "rank", "all")] > values[("unedited", "reliability", "rank", "all")]
    )

    main(fit_args(tmp_path / "enhance", neurons, "--model.init_args.mode", "enhance",
                  "--model.init_args.baselines", "[random]", command="validate"))  # fmt: skip
    values = table(run_dir(tmp_path / "enhance") / "editing_val.json")
    for language in ("en", "de", "zh-hans", "all"):
        for method in ("unedited", "enhanced", "enhanced_random"):
            assert (method, "facts", "rank", language) in values
    assert ("enhanced", "facts", "broken", "all") in values or ("enhanced", "facts", "fixed", "all") in values
    with pytest.raises(RuntimeError, match="training-free"):
        main(fit_args(tmp_path / "enhance-fit", neurons, "--model.init_args.mode", "enhance"))


def test_help_documents_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "knlight.tasks.editing.EditingModule"])
    text = capsys.readouterr().out
    for option in (
        "--model.neuron_rule",
        "--model.requests.edits_per_group",
        "--model.training.locality_weight",
        "--model.lm.model",
        "--model.optimizer",
    ):
        assert option in text
    assert "language_independent" in text and "sequential" in text


# ----------------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_gets_clear_errors(neurons: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="neuron_rule='lang': choose"):
        editing_module(neurons=str(neurons), neuron_rule="lang")
    with pytest.raises(ValueError, match="neurons: give a neuron file"):
        editing_module()
    with pytest.raises(ValueError, match=r"baselines \['dirct'\]"):
        editing_module(neurons=str(neurons), baselines=["dirct"])
    with pytest.raises(ValueError, match="uuid 'P99:nope': no such fact"):
        planned(neurons, edits=[{"uuid": "P99:nope"}])
    with pytest.raises(ValueError, match=r"edit_languages \['fr'\] are not in the data"):
        planned(neurons, edit_languages=["fr"])
    outside = write_neurons(tmp_path / "outside.json", {UUIDS[0]: [[2, 64]]}, d_ff=64)
    with pytest.raises(ValueError, match=r"\[2, 64\] is out of range|\(2, 64\) is outside"):
        planned(outside)
    other_model = write_neurons(tmp_path / "other.json", d_ff=128)
    with pytest.raises(ValueError, match="d_ff"):
        planned(other_model)
    with pytest.raises(ValueError, match="no fact to edit"):
        planned(neurons, neuron_rule="language:fr")
