"""Direct effects and the ``carriers`` selection.

The oracle for the direct effect is GPT-2's residual stream written out by hand: the final hidden state is the
embedding plus every attention and MLP output (pre-LN blocks add their sublayers' outputs), so removing one
neuron's write ``a_i · W_out[:, i]`` with every later sublayer held at its clean value is a subtraction from
that sum, then ``ln_f`` and the tied head.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from knlight import load_lm
from knlight.neurons.direct_effect import (
    DirectEffectError,
    direct_effects,
    direct_effects_of,
    linear_direct_effects,
    sufficiency_effects,
)
from knlight.neurons.neuron_file import NeuronFile, read_neuron_file, write_neuron_file
from knlight.selection import (
    DknOptions,
    KnOptions,
    LiknOptions,
    QueryAttribution,
    SelectionError,
    UncertaintyOptions,
    read_attributions,
    select_fact,
)
from knlight.selection.options import CarrierOptions
from knlight.selection.run import select_run

ITEMS = [("The capital of France is [Y].", "Paris"), ("Marie Curie was a [Y].", "physicist and chemist")]


def _hand_residual(lm, query) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """GPT-2's clean residual stream at the end, each MLP's activations and each block's MLP output."""
    model = lm.model.transformer
    ids = torch.tensor([query.input_ids])
    acts: list[torch.Tensor] = []
    outs: list[torch.Tensor] = []
    attn_outs: list[torch.Tensor] = []

    def mlp_hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        acts.append(args[0])
        outs.append(out)

    def attn_hook(
        module: torch.nn.Module, args: tuple[torch.Tensor, ...], out: tuple[torch.Tensor, ...]
    ) -> None:
        attn_outs.append(out[0])

    handles = [block.mlp.c_proj.register_forward_hook(mlp_hook) for block in model.h]
    handles += [block.attn.register_forward_hook(attn_hook) for block in model.h]
    with torch.no_grad():
        model(input_ids=ids)
    for h in handles:
        h.remove()
    positions = torch.arange(ids.shape[1])
    embed = model.wte(ids) + model.wpe(positions)[None]
    stream = embed + sum(attn_outs) + sum(outs)
    return stream, acts, outs


def _hand_log_p(lm, query, stream: torch.Tensor) -> torch.Tensor:
    logits = lm.model.lm_head(lm.model.transformer.ln_f(stream))
    log_probs = torch.log_softmax(logits[0].float(), -1)
    return sum(log_probs[p, t] for p, t in query.targets)


def test_direct_effect_equals_a_hand_computed_patched_forward() -> None:
    lm = load_lm("tiny:gpt2")
    neurons = [(0, 3), (1, 17), (2, 40), (2, 5), (0, 63)]
    queries = [lm.encode(*item) for item in ITEMS]
    got = direct_effects(lm, queries, neurons, chunk_rows=2)  # chunks of 2: the chunking is exercised too
    for q, query in enumerate(queries):
        stream, acts, _ = _hand_residual(lm, query)
        clean = _hand_log_p(lm, query, stream)
        positions = [p for p, _ in query.targets]
        for n, (layer, index) in enumerate(neurons):
            w_out = lm.model.transformer.h[layer].mlp.c_proj.weight  # Conv1D: [d_ff, d_model]
            patched = stream.clone()
            patched[0, positions] -= acts[layer][0, positions, index, None] * w_out[index]
            expected = clean - _hand_log_p(lm, query, patched)
            assert float(got[q, n]) == pytest.approx(float(expected), abs=1e-5)
    assert got.abs().max() > 1e-4  # the neurons do something: the comparison is not 0 == 0


def test_sufficiency_equals_a_hand_computed_patched_forward() -> None:
    """Sufficiency: every candidate's write removed from the clean residual stream (the base), then one
    candidate's own write put back; log P(with it) − log P(base), later sublayers held clean."""
    lm = load_lm("tiny:gpt2")
    neurons = [(0, 3), (1, 17), (2, 40), (2, 5), (0, 63)]
    queries = [lm.encode(*item) for item in ITEMS]
    got = sufficiency_effects(lm, queries, neurons, chunk_rows=2)
    for q, query in enumerate(queries):
        stream, acts, _ = _hand_residual(lm, query)
        positions = [p for p, _ in query.targets]
        writes = [
            acts[layer][0, positions, index, None] * lm.model.transformer.h[layer].mlp.c_proj.weight[index]
            for layer, index in neurons
        ]
        base = stream.clone()
        base[0, positions] -= sum(writes)
        for n, write in enumerate(writes):
            kept = base.clone()
            kept[0, positions] += write
            expected = _hand_log_p(lm, query, kept) - _hand_log_p(lm, query, base)
            assert float(got[q, n]) == pytest.approx(float(expected), abs=1e-5)
    assert got.abs().max() > 1e-4
    # Not the direct effect: with several candidates removed the answer's state differs.
    assert (got - direct_effects(lm, queries, neurons)).abs().max() > 1e-4


def test_direct_effect_is_not_the_total_effect() -> None:
    """Removing the write from the *input* of later layers too (a plain suppression) differs from the direct
    effect for a neuron below the last layer: the later layers are held clean only in the direct effect."""
    lm = load_lm("tiny:gpt2")
    query = lm.encode(*ITEMS[0])
    stream, _, _ = _hand_residual(lm, query)
    layer, index = 0, 3
    positions = [p for p, _ in query.targets]
    mlp = lm.model.transformer.h[layer].mlp.c_proj

    def remove(module, args, out):
        out = out.clone()
        out[0, positions] -= args[0][0, positions, index, None] * module.weight[index]
        return out

    handle = mlp.register_forward_hook(remove)
    try:
        total = float(
            _hand_log_p(lm, query, stream)
            - lm.target_log_probs([query])[0]
            .gather(-1, torch.tensor([[t] for _, t in query.targets]))[:, 0]
            .sum()
        )
    finally:
        handle.remove()
    direct = float(direct_effects(lm, [query], [(layer, index)])[0, 0])
    assert abs(total - direct) > 1e-6


def test_linear_direct_effect_is_the_derivative_of_the_hand_computed_one() -> None:
    """The linearised direct effect is ``−d/dε log P(stream − ε·write)`` at ε = 0 (through ln_f and the head,
    every sublayer held clean), computed here by autograd on the hand-written residual stream."""
    lm = load_lm("tiny:gpt2")
    query = lm.encode(*ITEMS[1])
    linear = linear_direct_effects(lm, query)
    assert linear.shape == (lm.num_layers, lm.d_ff)
    stream, acts, _ = _hand_residual(lm, query)
    positions = [p for p, _ in query.targets]
    for layer, index in [(0, 3), (1, 17), (2, 40)]:
        write = (
            acts[layer][0, positions, index, None] * lm.model.transformer.h[layer].mlp.c_proj.weight[index]
        )
        eps = torch.zeros((), requires_grad=True)
        with torch.enable_grad():
            patched = stream.detach().clone()
            patched[0, positions] = patched[0, positions] - eps * write.detach()
            (slope,) = torch.autograd.grad(_hand_log_p(lm, query, patched), eps)
        assert float(linear[layer, index]) == pytest.approx(-float(slope), rel=1e-3, abs=1e-6)
    exact = direct_effects(lm, [query], [(0, 3), (1, 17), (2, 40)])[0]
    # First order: the same sign and size as the exact effect for these small writes.
    assert torch.allclose(
        exact, torch.stack([linear[0, 3], linear[1, 17], linear[2, 40]]), rtol=0.5, atol=1e-3
    )
    picked = direct_effects_of(lm, [query], [(2, 40), (0, 3)], method="linear")
    assert torch.allclose(picked[0], torch.stack([linear[2, 40], linear[0, 3]]))
    with pytest.raises(ValueError, match="exact or linear"):
        direct_effects_of(lm, [query], [(0, 1)], method="patched")


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_direct_effect_runs_on_other_architectures(arch: str) -> None:
    """Gated (llama) and post-LN masked (bert): the clean row is the clean model, effects are finite, and a
    neuron's effect is the same whether computed alone or with others."""
    lm = load_lm(f"tiny:{arch}")
    query = lm.encode(*ITEMS[0])
    both = direct_effects(lm, [query], [(0, 1), (lm.num_layers - 1, 2)])
    alone = direct_effects(lm, [query], [(lm.num_layers - 1, 2)])
    assert torch.isfinite(both).all()
    assert float(both[0, 1]) == pytest.approx(float(alone[0, 0]), abs=1e-5)


def test_unknown_architecture_is_a_clear_error() -> None:
    lm = load_lm("tiny:gpt2")
    lm.model.config.model_type = "mystery"
    with pytest.raises(DirectEffectError, match="ATTENTION_OUTPUTS"):
        direct_effects(lm, [lm.encode(*ITEMS[0])], [(0, 1)])


def _item(
    uuid: str, language: str, query_id: int, query: str, answer: str, neurons: list
) -> QueryAttribution:
    return QueryAttribution(uuid, language, "P36", query_id, query, answer, 0.5, neurons, rank=1)


@pytest.mark.parametrize("sufficiency", [True, False])
def test_carriers_selection_keeps_the_candidates_that_write_the_answer(
    tmp_path: Path, sufficiency: bool
) -> None:
    """``select_fact`` with carriers: the candidates (knowledge neurons + top-k by attribution) get their mean
    direct effect; carriers are those >= threshold · the largest and >= min_effect; the other knowledge neurons
    are upstream; the fact's sets are the unions; the neuron file round-trips them."""
    lm = load_lm("tiny:gpt2")
    scores = [[0, 3, 1.0], [1, 17, 0.9], [2, 40, 0.8], [2, 5, 0.7], [0, 63, 0.6], [1, 2, 0.5]]
    per_language = {
        "en": [_item("F", "en", q, query, answer, scores) for q, (query, answer) in enumerate(ITEMS)],
        "de": [_item("F", "de", 0, "Die Hauptstadt von Frankreich ist [Y].", "Paris", scores[:4])],
    }
    options = CarrierOptions(enabled=True, top_k=4, threshold=0.3, min_effect=0.0, sufficiency=sufficiency)
    fact = select_fact(per_language, (lm.num_layers, lm.d_ff), ["de", "en"], {}, KnOptions(p=0.7, adaptive=False),
                       LiknOptions(), UncertaintyOptions(), DknOptions(), None, lm, carriers=options)  # fmt: skip
    assert fact.carriers is not None
    for language, items in per_language.items():
        encoded = [lm.encode(i.query, i.answer) for i in items]
        candidates = list(dict.fromkeys([*fact.languages[language], *[(a, b) for a, b, _ in scores[:4]]]))
        direct = direct_effects(lm, encoded, candidates).mean(0)
        enough = sufficiency_effects(lm, encoded, candidates).mean(0)
        score = torch.maximum(direct, enough) if sufficiency else direct
        bar = max(0.3 * float(score.max()), 0.0)
        expected = sorted((n for n, d in zip(candidates, score) if float(d) >= bar),
                          key=lambda n: -float(score[candidates.index(n)]))  # fmt: skip
        assert fact.carriers[language] == expected
        assert 0 < len(expected) < len(candidates)  # the rule separates something here
        assert fact.upstream[language] == [n for n in fact.languages[language] if n not in expected]
        got = {(a, b): (d, u) for a, b, _, d, u in fact.effects[language]}
        assert set(got) == set(candidates)
        for n, d, u in zip(candidates, direct, enough):
            assert got[n][0] == pytest.approx(float(d), abs=1e-6)
            assert got[n][1] is None if not sufficiency else got[n][1] == pytest.approx(float(u), abs=1e-6)
    union = {n for ns in fact.carriers.values() for n in ns}
    assert set(fact.carriers_fact) == union
    assert not set(fact.upstream_fact) & union
    # The neuron file keeps the sets per language and for the fact.
    path = write_neuron_file(
        tmp_path / "n.json", NeuronFile("tiny:gpt2", lm.num_layers, lm.d_ff, {}, {"F": fact})
    )
    again = read_neuron_file(path, lm.num_layers, lm.d_ff).facts["F"]
    assert again.neurons("carriers", "en") == fact.carriers["en"]
    assert again.neurons("carriers") == fact.carriers_fact
    assert again.neurons("upstream", "de") == fact.upstream["de"]
    assert [row[:2] for row in again.effects["en"]] == [row[:2] for row in fact.effects["en"]]
    assert [row[3] for row in again.effects["en"]] == pytest.approx(
        [row[3] for row in fact.effects["en"]], abs=1e-5
    )
    assert [row[4] for row in again.effects["en"]] == (
        pytest.approx([row[4] for row in fact.effects["en"]], abs=1e-5)
        if sufficiency
        else [None] * len(fact.effects["en"])
    )


def test_carriers_need_the_model(tmp_path: Path) -> None:
    root = tmp_path / "attr"
    root.mkdir()
    line = {"uuid": "F", "language": "en", "relation": "P36", "query_id": 0, "query": "q [Y]", "answer": "Paris",
            "prob": 0.5, "rank": 1, "neurons": [[0, 1, 1.0]]}  # fmt: skip
    (root / "attributions.jsonl").write_text(json.dumps(line) + "\n", "utf-8")

    with pytest.raises(SelectionError, match=r"carriers\.enabled needs the model"):
        select_run(
            read_attributions(root), None, "tiny:gpt2", None, 3, 64, carriers=CarrierOptions(enabled=True)
        )
