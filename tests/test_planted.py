"""Planted knowledge: facts, plant verification, degenerate pairs, export round trip, IG oracle check.

A small plant (2 layers, 64/64, 4 facts x 3 languages x 2 templates, one degenerate fact) is built once per
module; the other architectures get a smoke plant each.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import torch

from knlight import attribute_batch
from knlight.data.records import validate_records_file
from knlight.lm.sites import neuron_columns
from knlight.neurons.interventions import answer_log_probs
from knlight.planted import (
    CARRIER_KINDS,
    KINDS,
    PlantConfig,
    PlantedModel,
    build_tokenizer,
    load_planted,
    make_facts,
    plant,
    read_truth,
)
from knlight.planted.build import Planter
from knlight.planted.initialisation import _output_directions, carrier_direction_mode, initialise
from knlight.planted.planter import build_model

SMALL = dict(
    n_relations=2, facts_per_relation=2, templates_per_relation=2, layers=2, hidden=64, ff=64, steps=120,
    n_background=16, degenerate_fraction=0.25, plant_layers=[1],
)  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest (and disturb other jobs least) on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def planted(one_thread: None) -> PlantedModel:
    return plant("gpt2", seed=0, **SMALL)


def _items(planted: PlantedModel, record: dict) -> list:
    return [planted.lm.encode(q, record["object"]) for q in record["queries"]]


def _p(planted: PlantedModel, record: dict, sets: list[list[tuple[int, int]]]) -> torch.Tensor:
    """Mean P(object) over the record's queries, per suppressed neuron set."""
    return answer_log_probs(planted.lm, _items(planted, record), sets, factor=0.0).exp().mean(0)


def test_facts_have_disjoint_vocabularies_and_single_token_objects() -> None:
    facts = make_facts(n_relations=2, facts_per_relation=3, n_languages=3, slot="end", seed=1)
    vocab = [facts.words_of(lang) for lang in facts.languages]
    for i in range(len(vocab)):
        for j in range(i + 1, len(vocab)):
            assert not vocab[i] & vocab[j]
    tok = build_tokenizer(facts.vocabulary(), "causal")
    for rec in facts.records():
        assert rec["object"] not in rec["wrong_objects"]
        assert len(tok(rec["object"])["input_ids"]) == 1
        assert all(q.endswith("[Y]") and q.count("[Y]") == 1 and "[X]" not in q for q in rec["queries"])
    masked = make_facts(n_relations=3, facts_per_relation=2, slot="any", seed=2)
    queries = [q for rec in masked.records() for q in rec["queries"]]
    assert any(not q.endswith("[Y]") for q in queries)  # the slot may sit anywhere for masked LMs


def test_plant_answers_through_the_planted_neurons(planted: PlantedModel) -> None:
    report = planted.report
    assert report["p_clean"] > 0.8, report
    assert report["p_before"] < 0.1, report
    assert report["p_suppressed"] < 0.1, report
    # Per record: suppressing the fact's planted carriers at the target position removes the fact.
    for rec in planted.records:
        carriers = [(n.layer, n.index) for n in planted.neurons_for(rec["uuid"], rec["language"])]
        clean, suppressed = _p(planted, rec, [[], carriers]).tolist()
        assert clean > 0.6 and suppressed < 0.25 * clean, (rec["uuid"], rec["language"], clean, suppressed)


def test_degenerate_pair_either_member_suffices(planted: PlantedModel) -> None:
    records = [
        r
        for r in planted.records
        if any(n.kind == "degenerate" for n in planted.neurons_for(r["uuid"], r["language"]))
    ]
    assert records, "the small plant has a degenerate fact"
    for rec in records:
        a, b = [
            (n.layer, n.index)
            for n in planted.neurons_for(rec["uuid"], rec["language"])
            if n.kind == "degenerate"
        ]
        clean, only_a, only_b, both = _p(planted, rec, [[], [a], [b], [a, b]]).tolist()
        assert only_a > 0.6 * clean and only_b > 0.6 * clean, (clean, only_a, only_b)
        assert both < 0.25 * clean, (clean, both)


def test_only_the_planted_slices_changed(planted: PlantedModel) -> None:
    fresh = build_model(planted.config, planted.lm.tokenizer)
    trained = dict(planted.lm.model.named_parameters())
    # Every planted neuron's W_in slice is trained; its W_out column is trained (carrier) or set once
    # (distractor).
    allowed = {(n.layer, n.index) for n in planted.neurons}
    sites = planted.lm.sites
    for name, base in fresh.named_parameters():
        diff = (trained[name].detach() != base.detach()).nonzero().tolist()
        if not diff:
            continue
        layer = next(
            i for i, blk in enumerate(sites.blocks) if any(p is trained[name] for p in blk.parameters())
        )
        if trained[name] is sites.in_projs[layer][0].weight:  # Conv1D [in, out]: neuron = column
            assert {(layer, c) for _, c in diff} <= allowed, name
        elif trained[name] is sites.in_projs[layer][0].bias:
            assert {(layer, c[0]) for c in diff} <= allowed, name
        elif trained[name] is sites.out_projs[layer].weight:  # Conv1D [d_ff, d]: neuron = row
            assert {(layer, r) for r, _ in diff} <= allowed, name
        else:
            raise AssertionError(f"{name} changed but holds no planted slice")


def test_distractor_output_columns_keep_their_initial_value(planted: PlantedModel) -> None:
    """Training moves the carriers' W_out columns; a distractor's stays what the initialisation wrote."""
    torch.manual_seed(planted.config.seed)
    start = Planter(planted.config)
    initialise(start)
    conv1d = start.sites.spec.conv1d
    for n in planted.neurons:
        before = neuron_columns(start.sites.out_projs[n.layer], conv1d)[:, n.index]
        after = neuron_columns(planted.lm.sites.out_projs[n.layer], conv1d)[:, n.index]
        assert before.abs().sum() > 0, n
        assert torch.equal(before, after) != n.carrier, n


def test_export_round_trip(planted: PlantedModel, tmp_path) -> None:
    import os

    umask = os.umask(0o022)
    try:
        folder = planted.save(tmp_path / "plant")
        planted.save(folder)  # replacing an existing plant is fine
    finally:
        os.umask(umask)
    assert sorted(p.name for p in folder.iterdir()) == ["model", "plant.json", "records.jsonl", "truth.json"]
    assert folder.stat().st_mode & 0o777 == 0o755  # as a normally created folder, not mkdtemp's 0700
    assert (folder / "records.jsonl").stat().st_mode & 0o777 == 0o644
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    records = validate_records_file(folder / "records.jsonl")  # the data layer reads them
    assert [r.to_dict() for r in records] == planted.records
    truth = read_truth(folder / "truth.json", planted.lm.num_layers, planted.lm.d_ff)
    assert truth == planted.truth
    assert {e["kind"] for e in truth} == set(KINDS)
    keys = {(r["uuid"], r["language"]) for r in planted.records}
    assert all((e["uuid"], e["language"]) in keys for e in truth)
    again = load_planted(folder)
    assert set(again.neurons) == set(planted.neurons)
    assert again.config == planted.config
    rec = planted.records[0]
    assert torch.allclose(_p(again, rec, [[]]), _p(planted, rec, [[]]))


def test_truth_file_errors_name_the_entry(planted: PlantedModel, tmp_path) -> None:
    bad = [dict(planted.truth[0], layer=planted.lm.num_layers)]
    (tmp_path / "truth.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"entry 0 .* outside the model"):
        read_truth(tmp_path / "truth.json", planted.lm.num_layers, planted.lm.d_ff)


def test_zero_baseline_ig_ranks_the_carriers_first_within_their_layer(planted: PlantedModel) -> None:
    """Oracle check against the planted truth: exact IG puts each record's carriers on top of their layer."""
    hits = total = 0
    for rec in planted.records:
        carriers = planted.neurons_for(rec["uuid"], rec["language"], CARRIER_KINDS)
        scores = attribute_batch(planted.lm, _items(planted, rec), steps=8, completeness=False).scores
        for layer in {n.layer for n in carriers}:
            in_layer = {n.index for n in carriers if n.layer == layer}
            for q in range(scores.shape[0]):
                top = set(torch.topk(scores[q, layer], len(in_layer)).indices.tolist())
                hits += len(top & in_layer)
                total += len(in_layer)
    assert hits / total >= 0.9, hits / total


@pytest.mark.parametrize("model_type", ["llama", "bert"])
def test_other_architectures_plant(model_type: str) -> None:
    small = dict(SMALL, steps=200) if model_type == "bert" else SMALL
    planted = plant(model_type, seed=0, **small)
    assert isinstance(planted.config, PlantConfig)
    report = planted.report
    assert report["p_clean"] > 0.6, report
    assert report["p_suppressed"] < 0.1, report
    assert report["degenerate_both_mean"] < 0.3 < report["degenerate_single_min"], report
    assert report["carrier_direct_min"] <= report["carrier_direct_mean"], report
    assert 0.0 <= report["carrier_direct_share"] <= 1.0, report


@pytest.mark.parametrize(("model_type", "expected"), [("gpt2", "embedding"), ("bert", "head_gradient")])
def test_carrier_direction_auto_follows_the_head(model_type: str, expected: str) -> None:
    """``auto``: the object's output embedding when the head is that embedding (GPT-2), else the direct-path
    gradient (BERT's head transforms first). How much each direction raises log P(object) directly
    per unit write, measured on the random model by an independent patched forward."""
    config = PlantConfig(model_type=model_type, seed=0, **SMALL)
    planter = Planter(config)
    assert carrier_direction_mode(planter) == expected
    carrier = next(k for k, n in enumerate(planter.neurons) if n.carrier)
    neuron = planter.neurons[carrier]
    gains = {}
    for mode in ("embedding", "head_gradient"):
        planter.config.carrier_direction = mode
        direction = _output_directions(planter)[0][carrier]
        direction = direction / direction.norm()
        rows = [
            r
            for r, (u, g) in enumerate(planter.batch.query_key)
            if u == neuron.uuid and g in neuron.languages
        ]
        gains[mode] = sum(_write_gain(planter, r, neuron.layer, direction) for r in rows) / len(rows)
    # The gradient is the steepest direction by construction; the embedding is nearly as steep through a plain
    # head (so GPT-2/Llama plants keep it) and far less steep through BERT's transform.
    assert gains["head_gradient"] > 0 and gains["head_gradient"] >= gains["embedding"] - 1e-6, gains
    if expected == "embedding":
        assert gains["embedding"] >= 0.8 * gains["head_gradient"], gains
    else:
        assert gains["embedding"] < 0.5 * gains["head_gradient"], gains
    with pytest.raises(ValueError, match="carrier_direction"):
        planter.config.carrier_direction = "sideways"
        carrier_direction_mode(planter)


def _write_gain(planter: Planter, row: int, layer: int, direction: torch.Tensor, eps: float = 1e-2) -> float:
    """d log P(object) / d(write along ``direction``) at the row's target, later sublayers held at their clean
    outputs (finite difference of two patched forwards; hooks written here, not knlight's)."""
    lm = planter.lm
    item = planter.batch.encoded[row]
    ids = torch.tensor([item.input_ids])
    ((pos, tok),) = item.targets
    model_type = planter.config.model_type
    attn_path = {"gpt2": "attn.c_proj", "bert": "attention.output.dense"}[model_type]
    blocks = lm.sites.blocks
    clean: dict[tuple[str, int], torch.Tensor] = {}

    def run(scale: float) -> float:
        handles = []
        for j, block in enumerate(blocks):
            attn = block.get_submodule(attn_path)
            out_proj = lm.sites.out_projs[j]
            for kind, module in (("attn", attn), ("ffn", out_proj)):

                def hook(mod, args, out, kind=kind, j=j):  # type: ignore[no-untyped-def]
                    if scale == 0.0:
                        clean[(kind, j)] = out.detach()
                        return None
                    held = clean[(kind, j)].clone()
                    if kind == "ffn" and j == layer:
                        held[0, pos] += scale * direction
                    return held if (j > layer or (kind == "ffn" and j == layer)) else None

                handles.append(module.register_forward_hook(hook))
        try:
            with torch.no_grad():
                logits = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        finally:
            for h in handles:
                h.remove()
        return float(torch.log_softmax(logits[0, pos].double(), -1)[tok])

    base = run(0.0)
    return (run(eps) - base) / eps
