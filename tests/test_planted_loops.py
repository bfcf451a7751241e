"""Planted models on every architecture the planter serves, and every knlight loop run on a saved plant.

* Only the planted neurons' slices are trained (gpt2 ``Conv1D``, llama gate/up/down, bert with biases).
* Distractors fire on their fact's queries but carry nothing: suppressing one leaves P(object) unchanged.
* ``knlight predict`` -> ``knlight.select`` (with DKN) -> ``knlight test`` (interventions) -> ``knlight fit``
  (editing) each run once on a folder written by ``PlantedModel.save``, as the README says; the selection
  finds the planted degenerate pair.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from knlight.cli import main
from knlight.lm.hooks import capture_activations
from knlight.neurons.interventions import answer_log_probs
from knlight.neurons.neuron_file import read_neuron_file
from knlight.planted import PlantedModel, plant
from knlight.planted.planter import build_model
from knlight.selection import DknOptions, LiknOptions, run_selection

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(
    n_relations=2, facts_per_relation=2, templates_per_relation=2, layers=2, hidden=64, ff=64, steps=120,
    n_background=16, degenerate_fraction=0.25, plant_layers=[1],
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module", params=["gpt2", "llama", "bert"])
def planted(request: pytest.FixtureRequest) -> PlantedModel:
    steps = 200 if request.param == "bert" else SMALL["steps"]
    return plant(request.param, seed=0, **{**SMALL, "steps": steps})


def test_only_the_planted_slices_changed(planted: PlantedModel) -> None:
    """Every changed weight element belongs to a planted neuron's W_in row (+ bias) or W_out column."""
    fresh = dict(build_model(planted.config, planted.lm.tokenizer).named_parameters())
    sites = planted.lm.sites
    conv1d = sites.spec.conv1d
    allowed = {(n.layer, n.index) for n in planted.neurons}
    owners: dict[int, tuple[int, str]] = {}
    for layer in range(sites.num_layers):
        for proj in sites.in_projs[layer]:
            owners[id(proj.weight)] = (layer, "in")
            if getattr(proj, "bias", None) is not None:
                owners[id(proj.bias)] = (layer, "bias")
        owners[id(sites.out_projs[layer].weight)] = (layer, "out")
    touched: set[tuple[int, int]] = set()
    for name, trained in planted.lm.model.named_parameters():
        changed = (trained.detach() != fresh[name].detach()).nonzero().tolist()
        if not changed:
            continue
        assert id(trained) in owners, f"{name} changed but holds no neuron slice"
        layer, role = owners[id(trained)]
        if role == "bias":
            neurons = {(layer, c[0]) for c in changed}
        elif role == "in":  # Linear [d_ff, d]: neuron = row; Conv1D [d, d_ff]: neuron = column
            neurons = {(layer, c[1] if conv1d else c[0]) for c in changed}
        else:  # Linear [d, d_ff]: neuron = column; Conv1D [d_ff, d]: neuron = row
            neurons = {(layer, c[0] if conv1d else c[1]) for c in changed}
        assert neurons <= allowed, (name, sorted(neurons - allowed)[:5])
        touched |= neurons
    assert touched == allowed  # and every planted neuron was trained
    report = planted.report
    assert report["p_clean"] > 0.6 and report["p_suppressed"] < 0.1, report
    assert report["degenerate_both_mean"] < 0.3 < report["degenerate_single_min"], report


def test_distractors_fire_but_write_nothing(planted: PlantedModel) -> None:
    lm = planted.lm
    distractors = [n for n in planted.neurons if n.kind == "distractor"]
    assert distractors
    for neuron in distractors:
        for record in (
            r for r in planted.records if r["uuid"] == neuron.uuid and r["language"] in neuron.languages
        ):
            items = [lm.encode(q, record["object"]) for q in record["queries"]]
            for item in items:  # it fires at the target position of its fact's queries ...
                store: dict[int, torch.Tensor] = {}
                with torch.no_grad(), capture_activations(lm.sites.out_projs, store):
                    lm.model(input_ids=torch.tensor([item.input_ids]))
                assert float(store[neuron.layer][0, item.targets[0][0], neuron.index]) > 0.5
            # ... but suppressing it changes P(object) little: its write is orthogonal to every object's
            # output embedding, only the final norm's rescaling moves P (measured: <= 9 % on gpt2, ~1 % on
            # llama/bert), against the ~100 % drop when the fact's carriers are suppressed
            carriers = [(n.layer, n.index) for n in planted.neurons_for(neuron.uuid, record["language"])]
            p = answer_log_probs(lm, items, [[], [(neuron.layer, neuron.index)], carriers], factor=0.0).exp()
            distractor_effect = ((p[:, 1] - p[:, 0]).abs() / p[:, 0]).max()
            carrier_effect = ((p[:, 2] - p[:, 0]).abs() / p[:, 0]).min()
            assert distractor_effect <= 0.15 and distractor_effect <= carrier_effect / 5, (neuron, p)


def _run(*args: str) -> None:
    main(list(args))


def test_every_loop_runs_on_a_saved_plant(tmp_path: Path) -> None:
    planted = plant("gpt2", seed=0, **SMALL)
    folder = planted.save(tmp_path / "plant")
    model, records = str(folder / "model"), str(folder / "records.jsonl")
    quiet = ["--trainer.enable_progress_bar", "false"]

    # predict: attribution of every planted query
    _run("predict", "--config", str(REPO / "configs" / "tiny" / "localize.yaml"), *quiet,
         "--model.init_args.lm.model", model, "--data.init_args.path", records, "--model.init_args.ig.steps", "8",
         "--model.init_args.language_thresholds", "{}",
         "--trainer.callbacks.init_args.output_dir", str(tmp_path / "attributions"))  # fmt: skip
    lines = (tmp_path / "attributions" / "attributions.jsonl").read_text("utf-8").splitlines()
    assert len(lines) == sum(len(r["queries"]) for r in planted.records)

    # select, with DKN: the planted degenerate pair is found (each member alone keeps > 60 % of P, both
    # together remove the fact, so with t_low = 0.4 AMIG's Algorithm 1 must accept it)
    neurons_path = tmp_path / "neurons.json"
    selected = run_selection(str(tmp_path / "attributions"), str(neurons_path), likn=LiknOptions(min_languages=2),
                             dkn=DknOptions(enabled=True, t_low=0.4))  # fmt: skip
    pairs = {}
    for n in planted.neurons:
        if n.kind == "degenerate":
            pairs.setdefault(n.uuid, []).append((n.layer, n.index))
    assert pairs
    for uuid, members in pairs.items():
        found = {tuple(sorted(p)) for p in selected.facts[uuid].degenerate_pairs}
        assert tuple(sorted(members)) in found, (uuid, members, found)
    assert read_neuron_file(neurons_path).model == model

    # test: interventions with the selected neurons remove the planted facts
    _run("test", "--config", str(REPO / "configs" / "tiny" / "intervene.yaml"), *quiet,
         "--model.init_args.lm.model", model, "--data.init_args.path", records,
         "--model.init_args.methods", json.dumps({"dai": {"neurons": str(neurons_path)}}),
         "--model.init_args.unrelated_per_query", "2", "--model.init_args.output_dir", str(tmp_path / "intervention"),
         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"))  # fmt: skip
    rows = json.loads((tmp_path / "intervention" / "intervention.json").read_text("utf-8"))["intervention"]
    suppress = next(r for r in rows if (r["method"], r["neurons"], r["operation"], r["group_by"]) ==
                    ("dai", "selected", "suppress", "all"))  # fmt: skip
    assert suppress["units"] == len(planted.records) and suppress["dp_related"] < -0.5

    # fit: edit two facts through their language-independent neurons
    _run("fit", "--config", str(REPO / "configs" / "tiny" / "edit.yaml"), *quiet,
         "--model.init_args.lm.model", model, "--data.init_args.path", records,
         "--model.init_args.neurons", str(neurons_path), "--model.init_args.neuron_rule", "language_independent",
         "--model.init_args.layers", "null", "--model.init_args.requests.edit_languages", "[qaa]",
         "--data.init_args.split_fractions", "[1.0, 0.0, 0.0]",
         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"))  # fmt: skip
    (version,) = (tmp_path / "runs" / "tiny-edit").glob("version_*")
    assert (version / "edit.safetensors").is_file()
    values = {(r["method"], r["role"], r["measure"], r["language"]): r["value"]
              for r in json.loads((version / "editing_val.json").read_text("utf-8"))["rows"]}  # fmt: skip
    assert (
        values[("edited", "reliability", "rank", "all")] > values[("unedited", "reliability", "rank", "all")]
    )
