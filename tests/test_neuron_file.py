"""The neuron file: round trip, layout, validation against a model, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knlight.neurons.neuron_file import (
    FactNeurons,
    NeuronFile,
    NeuronFileError,
    read_neuron_file,
    write_neuron_file,
)

REPO = Path(__file__).resolve().parents[1]


def sample() -> NeuronFile:
    fact = FactNeurons(
        relation="P36",
        languages={"en": [(2, 5), (1, 0)], "zh-hans": [(2, 5)]},
        language_independent=[(2, 5)],
        uncertainty=[(2, 5), (0, 7)],
        degenerate_pairs=[((1, 1), (2, 3))],
        degenerate_sets=[[(0, 1), (0, 2), (1, 4)]],
        p={"en": 0.65, "zh-hans": 0.7},
    )
    return NeuronFile("tiny:gpt2", 3, 8, {"kn": {"p": 0.7}}, {"P36:Q142:Q90": fact, "P37:x": FactNeurons()})


def test_round_trip_and_layout(tmp_path: Path) -> None:
    path = write_neuron_file(tmp_path / "sub" / "neurons.json", sample())
    text = path.read_text("utf-8")
    data = json.loads(text)
    assert data["format"] == "knlight-neurons/1" and data["num_layers"] == 3 and data["d_ff"] == 8
    assert list(data["facts"]) == ["P36:Q142:Q90", "P37:x"]
    assert sum(line.lstrip().startswith('"P3') for line in text.splitlines()) == 2  # one fact per line
    assert data["facts"]["P36:Q142:Q90"]["degenerate"] == {
        "pairs": [[[1, 1], [2, 3]]],
        "sets": [[[0, 1], [0, 2], [1, 4]]],
    }
    back = read_neuron_file(path, num_layers=3, d_ff=8)
    assert back.facts == sample().facts and back.model == "tiny:gpt2" and back.method == {"kn": {"p": 0.7}}
    assert back.path == str(path)
    assert [p.name for p in path.parent.iterdir()] == ["neurons.json"]  # no temporary file left behind


def test_fact_neuron_sets() -> None:
    fact = sample().facts["P36:Q142:Q90"]
    assert fact.neurons("language", "en") == [(2, 5), (1, 0)]
    assert fact.neurons("language", "fr") == []
    assert fact.neurons("language_independent") == [(2, 5)]
    assert fact.neurons("degenerate") == [(1, 1), (2, 3), (0, 1), (0, 2), (1, 4)]
    with pytest.raises(ValueError, match="needs a language"):
        fact.neurons("language")
    with pytest.raises(ValueError, match="unknown neuron kind"):
        fact.neurons("nope")


def _write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data), "utf-8")
    return path


def _valid() -> dict:
    return json.loads(json.dumps(sample().to_json()))


def test_out_of_range_neuron_names_file_fact_set_and_neuron(tmp_path: Path) -> None:
    data = _valid()
    data["facts"]["P36:Q142:Q90"]["languages"]["en"].append([1, 8])
    path = _write(tmp_path, data)
    with pytest.raises(
        NeuronFileError,
        match=r"bad\.json: fact 'P36:Q142:Q90', languages\.en: neuron \[1, 8\] is out of range",
    ):
        read_neuron_file(path)
    data = _valid()
    data["facts"]["P37:x"]["degenerate"] = {"pairs": [[[0, 0], [3, 0]]], "sets": []}
    with pytest.raises(NeuronFileError, match=r"fact 'P37:x', degenerate\.pairs\[0\]: neuron \[3, 0\]"):
        read_neuron_file(_write(tmp_path, data))


def test_effects_rows_with_and_without_the_sufficiency(tmp_path: Path) -> None:
    """Rows carry the sufficiency (or null: not measured); a file from before it (four numbers) still reads."""
    data = _valid()
    data["facts"]["P37:x"]["effects"] = {
        "en": [[0, 1, 0.5, 0.2, 0.9], [0, 2, 0.4, 0.1, None]],
        "de": [[0, 3, 0.3, 0.1]],
    }
    effects = read_neuron_file(_write(tmp_path, data)).facts["P37:x"].effects
    assert effects == {"en": [(0, 1, 0.5, 0.2, 0.9), (0, 2, 0.4, 0.1, None)], "de": [(0, 3, 0.3, 0.1, None)]}


def test_model_of_another_shape_is_refused(tmp_path: Path) -> None:
    path = write_neuron_file(tmp_path / "n.json", sample())
    with pytest.raises(
        NeuronFileError, match=r"n\.json was selected on 'tiny:gpt2' with d_ff=8 .* has d_ff=16"
    ):
        read_neuron_file(path, num_layers=3, d_ff=16)
    with pytest.raises(NeuronFileError, match=r"with 3 layers, but this model has 12"):
        read_neuron_file(path, num_layers=12, d_ff=8)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(format="other/2"), r"not a knlight neuron file \(format 'other/2'"),
        (lambda d: d.update(d_ff=0), r"'d_ff' must be a positive integer"),
        (lambda d: d.update(facts=[]), r"'facts' must be an object"),
        (lambda d: d["facts"]["P37:x"].update(languages={"en": [[1]]}), r"a neuron must be \[layer, index\]"),
        (lambda d: d["facts"]["P37:x"].update(languages={"en": [[True, 1]]}), r"two integers"),
        (lambda d: d["facts"]["P37:x"].update(uncertainty=[["1", 2]]), r"uncertainty: a neuron must be"),
        (lambda d: d["facts"]["P37:x"].update(colour="red"), r"unknown key\(s\) colour"),
        (
            lambda d: d["facts"]["P37:x"].update(degenerate={"pairs": [[[0, 1], [0, 2], [0, 3]]]}),
            "a pair has two",
        ),
        (
            lambda d: d["facts"]["P37:x"].update(effects={"en": [[0, 1, 0.5, 0.2, "big"]]}),
            r"P37:x', effects\.en: each row is \[layer, index, total, direct, sufficiency or null\]",
        ),
        (lambda d: d["facts"]["P37:x"].update(effects={"en": [[0, 1, 0.5]]}), r"effects\.en: each row is"),
    ],
)
def test_malformed_files_are_named(tmp_path: Path, change, message: str) -> None:
    data = _valid()
    change(data)
    with pytest.raises(NeuronFileError, match=message):
        read_neuron_file(_write(tmp_path, data))


def test_missing_and_invalid_json(tmp_path: Path) -> None:
    with pytest.raises(NeuronFileError, match=r"does not exist; create it with `python -m knlight.select"):
        read_neuron_file(tmp_path / "nowhere.json")
    bad = tmp_path / "broken.json"
    bad.write_text("{not json", "utf-8")
    with pytest.raises(NeuronFileError, match=r"broken\.json is not valid UTF-8 JSON"):
        read_neuron_file(bad)


def test_writing_refuses_invalid_neurons(tmp_path: Path) -> None:
    neurons = sample()
    neurons.facts["P37:x"].uncertainty = [(3, 0)]
    with pytest.raises(NeuronFileError, match="out of range"):
        write_neuron_file(tmp_path / "n.json", neurons)
    assert not (tmp_path / "n.json").exists()


@pytest.mark.parametrize("name", ["dai", "amig"])
def test_committed_tiny_neuron_files_fit_the_tiny_model(name: str) -> None:
    neurons = read_neuron_file(REPO / "configs" / "tiny" / "neurons" / f"{name}.json", num_layers=3, d_ff=64)
    assert neurons.model == "tiny:gpt2" and len(neurons.facts) == 4
    assert all(set(f.languages) == {"de", "en", "zh-hans"} for f in neurons.facts.values())
