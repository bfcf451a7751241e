"""Plants for fair fact-checking (knlight/planted/shared.py): a relation's degenerate pair shared by its facts
(each member alone sufficient, both necessary), unknown facts the model was never taught, and a folder every
plant reader loads."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from knlight.planted import PlantedModel, load_planted
from knlight.planted.shared import plant_shared, truth_labels
from knlight.planted.verify import answer_probs

SMALL = dict(
    n_relations=2, facts_per_relation=3, templates_per_relation=3, layers=2, hidden=64, ff=64, steps=150,
    n_background=16, degenerate_fraction=0.0, plant_layers=[1], n_specific=1, n_independent=1,
)  # fmt: skip


@pytest.fixture(scope="module")
def planted() -> Iterator[PlantedModel]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield plant_shared("gpt2", 0, relation_neurons=0, generic_neurons=0, shared_pairs=True,
                       unknown_fraction=1 / 3, **SMALL)  # fmt: skip
    torch.set_num_threads(before)


def _p(planted: PlantedModel, uuid: str, sets: list[list[tuple[int, int]]]) -> torch.Tensor:
    """Mean P(object) over every query of the fact, per suppressed set."""
    lm = planted.lm
    items = [lm.encode(q, r["object"]) for r in planted.records if r["uuid"] == uuid for q in r["queries"]]
    return answer_probs(lm, items, sets).mean(0)


def test_unknown_facts_are_not_known(planted: PlantedModel) -> None:
    unknown = planted.report["unknown_facts"]
    assert len(unknown) == 2  # one of the three facts of each relation
    assert {r["uuid"] for r in planted.records} >= set(unknown)  # their records are written (claims, filter)
    assert not any(n.uuid in unknown for n in planted.neurons)  # and nothing is planted for them
    for uuid in unknown:
        assert float(_p(planted, uuid, [[]])[0]) < 0.05
    known = {r["uuid"] for r in planted.records} - set(unknown)
    assert min(float(_p(planted, u, [[]])[0]) for u in known) > 0.5


def test_a_relation_pair_is_shared_and_degenerate(planted: PlantedModel) -> None:
    pairs: dict[tuple[str, ...], list[tuple[int, int]]] = {}
    for s in planted.report["shared_neurons"]:
        assert s["kind"] == "relation_degenerate"
        pairs.setdefault(tuple(s["facts"]), []).append((s["layer"], s["index"]))
    assert len(pairs) == 2 and all(len(facts) == 2 for facts in pairs)  # the known facts of each relation
    for facts, (a, b) in pairs.items():
        for uuid in facts:
            clean, only_a, only_b, both = _p(planted, uuid, [[], [a], [b], [a, b]]).tolist()
            assert only_a / clean > 0.8 and only_b / clean > 0.8, (uuid, clean, only_a, only_b)
            assert both / clean < 0.75, (uuid, clean, both)  # AMIG's t_high: a drop of more than 25 %


def test_the_folder_loads_with_the_truth(planted: PlantedModel, tmp_path: Path) -> None:
    again = load_planted(planted.save(tmp_path / "plant"))
    assert again.report["unknown_facts"] == planted.report["unknown_facts"]
    assert {(n.uuid, n.layer, n.index, n.kind) for n in again.neurons} == {
        (n.uuid, n.layer, n.index, n.kind) for n in planted.neurons
    }
    labels = truth_labels(again)
    shared = {(s["layer"], s["index"]) for s in planted.report["shared_neurons"]}
    assert {label for (_, n), label in labels.items() if n in shared} == {"relation"}
