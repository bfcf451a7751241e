"""AMIG's baseline, checked independently of the engines' AMIG path.

1. The per-word baseline inputs themselves: one word at a time becomes [MASK] (masked LMs) or EOS (causal LMs),
   CJK text counts one token per word, special tokens and the answer slot are never touched.
2. The two aggregations rebuilt by hand from per-baseline integrals of the reference engine (the oracle that
   agrees with captum): the paper's sum of per-word IG normalised per layer, and the code's averaged baseline
   with the prefactor ā.
"""

from __future__ import annotations

import functools

import pytest
import torch

from knlight import attribute_batch, load_lm
from knlight.lm.hooks import capture_activations
from knlight.neurons.attribution import baseline_sequences
from knlight.neurons.engines import ReferenceEngine
from knlight.neurons.ig import Problems, quadrature


@functools.cache
def tiny(arch: str):
    return load_lm(f"tiny:{arch}")


def replaced_positions(original: tuple[int, ...], variant: tuple[int, ...]) -> list[int]:
    assert len(original) == len(variant)
    return [p for p, (a, b) in enumerate(zip(original, variant)) if a != b]


def words_of(lm, encoded, variants) -> list[str]:
    """The text each baseline input replaced, decoded from the positions it changed."""
    out = []
    for variant in variants:
        positions = replaced_positions(encoded.input_ids, variant)
        assert positions == list(range(positions[0], positions[-1] + 1)), "a word is one contiguous span"
        assert all(variant[p] == lm.baseline_token_id for p in positions)
        out.append(lm.tokenizer.decode([encoded.input_ids[p] for p in positions]).strip())
    return out


def test_masked_lm_replaces_each_word_by_mask_and_never_specials_or_the_slot() -> None:
    lm = tiny("bert")
    encoded = lm.encode("The capital of France is [Y].", "Paris")
    variants = baseline_sequences(encoded, lm.baseline_token_id)
    assert lm.baseline_token_id == lm.tokenizer.mask_token_id
    assert words_of(lm, encoded, variants) == ["The", "capital", "of", "France", "is", "."]
    specials = {lm.tokenizer.cls_token_id, lm.tokenizer.sep_token_id}
    slot = {p for p, _ in encoded.targets}
    for variant in variants:
        for p in replaced_positions(encoded.input_ids, variant):
            assert encoded.input_ids[p] not in specials and p not in slot
    assert (
        encoded.input_ids[0] == lm.tokenizer.cls_token_id
        and encoded.input_ids[-1] == lm.tokenizer.sep_token_id
    )


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_causal_lm_replaces_each_prompt_word_by_eos_and_keeps_bos_and_the_answer_prefix(arch: str) -> None:
    lm = tiny(arch)
    encoded = lm.encode("Marie Curie was a [Y].", "physicist and chemist")
    variants = baseline_sequences(encoded, lm.baseline_token_id)
    assert lm.baseline_token_id == lm.tokenizer.eos_token_id
    assert words_of(lm, encoded, variants) == ["Marie", "Curie", "was", "a"]
    first_target = encoded.targets[0][0]
    for variant in variants:
        positions = replaced_positions(encoded.input_ids, variant)
        assert max(positions) <= first_target  # the teacher-forced answer prefix stays
    if lm.tokenizer.bos_token_id is not None and arch == "llama":
        assert encoded.input_ids[0] == lm.tokenizer.bos_token_id
        assert all(v[0] == lm.tokenizer.bos_token_id for v in variants)


@pytest.mark.parametrize(
    ("arch", "query", "words"),
    [
        (
            "bert",
            "日本の首都は[Y]です",
            ["日", "本", "の", "首", "都", "は", "です"],
        ),  # one character per token
        ("gpt2", "日本の首都は[Y]です", ["日本の首都は"]),  # a merged token is one word
        # byte-level BPE: a character's bytes (and a token ending inside the next one) form one word
        ("gpt2", "東京の人口は[Y]です", ["東京", "の", "人", "口", "は"]),
        ("llama", "東京の人口は[Y]です", ["東京", "の", "人", "口", "は"]),
    ],
)
def test_cjk_text_counts_one_token_per_word(arch: str, query: str, words: list[str]) -> None:
    lm = tiny(arch)
    encoded = lm.encode(query, "東京")
    variants = baseline_sequences(encoded, lm.baseline_token_id)
    assert words_of(lm, encoded, variants) == words
    # every prompt token (not specials, not the slot) is replaced by exactly one baseline
    specials = set(lm.tokenizer.all_special_ids)
    slot = {p for p, _ in encoded.targets}
    last = len(encoded.input_ids) if lm.masked else encoded.targets[0][0] + 1
    context = [
        p for p in range(last) if encoded.input_ids[p] not in specials and (p not in slot or not lm.masked)
    ]
    assert sorted(p for v in variants for p in replaced_positions(encoded.input_ids, v)) == context


def _target_acts(lm, ids: tuple[int, ...], positions: list[int]) -> torch.Tensor:
    """``[targets, layers, d_ff]`` activations of one input at the target positions (a plain forward)."""
    store: dict[int, torch.Tensor] = {}
    with torch.no_grad(), capture_activations(lm.sites.out_projs, store):
        lm.model(input_ids=torch.tensor([list(ids)]))
    return torch.stack([store[layer][0, positions] for layer in range(lm.num_layers)], dim=1).float()


def _integral(
    engine, encoded, layer: int, start: torch.Tensor, end: torch.Tensor, steps: int
) -> torch.Tensor:
    """``sum_k w_k dF/da`` along start -> end at ``layer`` for every target of one item, ``[targets, d_ff]``."""
    k = len(encoded.targets)
    problems = Problems(
        seq=torch.zeros(k, dtype=torch.long),
        position=torch.tensor([p for p, _ in encoded.targets]),
        token=torch.tensor([t for _, t in encoded.targets]),
        layer=torch.full((k,), layer),
        base=start,
        diff=end - start,
    )
    alphas, weights = quadrature("riemann_right", steps)
    grad, _ = engine.integrate(problems, alphas, weights, "prob", need_f0=False)
    return grad


@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("aggregation", ["paper", "code"])
def test_aggregations_rebuilt_by_hand_from_per_baseline_reference_integrals(
    arch: str, aggregation: str
) -> None:
    lm = tiny(arch)
    query, answer, steps = "Marie Curie was a [Y].", "physicist and chemist", 3
    encoded = lm.encode(query, answer)
    positions = [p for p, _ in encoded.targets]
    a_bar = _target_acts(lm, encoded.input_ids, positions)  # [targets, layers, d_ff]
    bases = [_target_acts(lm, v, positions) for v in baseline_sequences(encoded, lm.baseline_token_id)]
    engine = ReferenceEngine(lm)
    engine.clean([encoded.input_ids], [encoded.targets], keep=True)
    expected = torch.zeros(lm.num_layers, lm.d_ff)
    for layer in range(lm.num_layers):
        clean = a_bar[:, layer]
        if aggregation == "paper":  # Eq. 4-5: sum the per-word IG, normalise the layer by its total
            total = sum(
                ((clean - b[:, layer]) * _integral(engine, encoded, layer, b[:, layer], clean, steps)).sum(0)
                for b in bases
            )
            expected[layer] = total / total.sum().abs()
        else:  # the AMIG code: one path from the averaged baseline, prefactor ā instead of (ā - a')
            mean = torch.stack([b[:, layer] for b in bases]).mean(0)
            expected[layer] = (clean * _integral(engine, encoded, layer, mean, clean, steps)).sum(0)
    for engine_name in ("fast", "reference"):
        got = attribute_batch(
            lm, [(query, answer)], steps=steps, baseline="amig", aggregation=aggregation, engine=engine_name
        ).scores[0]
        scale = expected.abs().max()
        assert scale > 0
        assert float((got - expected).abs().max() / scale) <= 1e-5, (engine_name, aggregation)
