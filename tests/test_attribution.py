"""Exactness of the IG engines: fast == reference (all architectures), reference == captum, == EleutherAI."""

from __future__ import annotations

import functools

import pytest
import torch
from conftest import oracle

from knlight import attribute, attribute_batch, load_lm
from knlight.lm.hooks import edit_activations
from knlight.lm.tiny import ARCHITECTURES
from knlight.neurons.engines import ReferenceEngine
from knlight.neurons.ig import QUADRATURES, Problems, quadrature

# Different lengths (padding in the fast engine's batch), a non-Latin script and multi-token answers.
ITEMS = [
    ("The capital of France is [Y].", "Paris"),
    ("Die Hauptstadt von Deutschland ist [Y].", "Berlin"),
    ("日本の首都は[Y]です", "東京"),
    ("Marie Curie was a [Y].", "physicist and chemist"),
]


@functools.cache
def tiny(arch: str):
    return load_lm(f"tiny:{arch}")


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def test_items_exercise_multi_token_answers_and_padding() -> None:
    for arch in ("bert", "gpt2"):
        encoded = [tiny(arch).encode(q, a) for q, a in ITEMS]
        assert max(len(e.targets) for e in encoded) > 1
        assert len({len(e.input_ids) for e in encoded}) > 1


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(
    ("baseline", "aggregation"), [("zero", "paper"), ("amig", "paper"), ("amig", "code")]
)
def test_fast_equals_reference(arch: str, baseline: str, aggregation: str) -> None:
    lm = tiny(arch)
    for quad in QUADRATURES:
        kwargs = dict(steps=4, baseline=baseline, aggregation=aggregation, quadrature_name=quad)
        ref = attribute_batch(lm, ITEMS, engine="reference", **kwargs)
        fast = attribute_batch(lm, ITEMS, engine="fast", chunk_rows=24, **kwargs)
        assert ref.scores.abs().max() > 0
        if baseline == "amig" and aggregation == "paper":
            # Compare before the per-layer normalisation, which divides by a sum that can nearly cancel.
            fast.scores *= (fast.residual + fast.delta).abs()[..., None]
            ref.scores *= (ref.residual + ref.delta).abs()[..., None]
        assert rel_diff(fast.scores, ref.scores) <= 1e-5, (arch, baseline, quad)  # measured <= 7.4e-6
        assert torch.allclose(fast.prob, ref.prob, rtol=1e-5)
        # residual = sum_i Attr - ΔF: its rounding error scales with the size of the attribution sum, which with
        # few steps can be far above ΔF (tiny Gemma, m=4: ΔF = 0.008, sum = 3.5), so the bound is relative to
        # the larger of the two (measured <= 5.4e-7 of it).
        scale = max(float(ref.delta.abs().max()), float(ref.residual.abs().max()))
        assert torch.allclose(fast.residual, ref.residual, atol=1e-5 * scale + 1e-9)


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(
    ("dtype", "objective", "bound"),
    # measured: log_prob <= 4.2e-6; float64 <= 1.3e-7 (scores are accumulated in float32); bf16 <= 1.9e-2
    [("float32", "log_prob", 1e-5), ("float64", "prob", 1e-6), ("bf16", "prob", 5e-2)],
)
def test_fast_equals_reference_in_other_dtypes_and_for_log_prob(
    arch: str, dtype: str, objective: str, bound: float
) -> None:
    lm = load_lm(f"tiny:{arch}", dtype=dtype)
    assert next(lm.model.parameters()).dtype == {"float32": torch.float32, "float64": torch.float64,
                                                 "bf16": torch.bfloat16}[dtype]  # fmt: skip
    kwargs = dict(
        steps=4, quadrature_name="gauss_legendre", objective=objective, baseline="amig", aggregation="code"
    )
    ref = attribute_batch(lm, ITEMS, engine="reference", **kwargs)
    fast = attribute_batch(lm, ITEMS, engine="fast", chunk_rows=24, **kwargs)
    assert ref.scores.abs().max() > 0
    assert rel_diff(fast.scores, ref.scores) <= bound, (arch, dtype, objective)


def test_layers_subset_and_single_query_face() -> None:
    lm = tiny("llama")
    full = attribute(lm, *ITEMS[0], steps=3)
    part = attribute(lm, *ITEMS[0], steps=3, layers=[2, 0])
    assert full.shape == (lm.num_layers, lm.d_ff) and part.shape == (2, lm.d_ff)
    assert torch.allclose(part[0], full[2], rtol=1e-5, atol=1e-9)
    assert torch.allclose(part[1], full[0], rtol=1e-5, atol=1e-9)


def test_batching_does_not_change_scores() -> None:
    lm = tiny("gpt2")
    batch = attribute_batch(lm, ITEMS, steps=3).scores
    for i, item in enumerate(ITEMS):
        alone = attribute(lm, *item, steps=3)
        assert rel_diff(batch[i], alone) <= 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_completeness_residual_shrinks_with_steps(arch: str) -> None:
    lm = tiny(arch)
    residual = {
        m: attribute_batch(lm, ITEMS[:2], steps=m, quadrature_name="riemann_right").residual.abs().max()
        for m in (2, 8, 32)
    }
    delta = attribute_batch(lm, ITEMS[:2], steps=2).delta.abs().max()
    assert residual[32] < residual[8] < residual[2]
    assert residual[32] < 0.05 * delta
    gl = attribute_batch(lm, ITEMS[:2], steps=16, quadrature_name="gauss_legendre").residual.abs().max()
    assert gl < 1e-3 * delta


def test_quadrature_rules() -> None:
    for name in QUADRATURES:
        alphas, weights = quadrature(name, 7)
        assert torch.isclose(weights.sum(), torch.tensor(1.0, dtype=torch.float64))
        # ∫0^1 x dx = 1/2: exact for all but the right Riemann sum, which gives (m+1)/(2m).
        expected = 8 / 14 if name == "riemann_right" else 0.5
        assert torch.isclose((weights * alphas).sum(), torch.tensor(expected, dtype=torch.float64))
    assert torch.allclose(
        quadrature("riemann_right", 4)[0], torch.tensor([0.25, 0.5, 0.75, 1.0], dtype=torch.float64)
    )
    assert quadrature("eleuther", 5)[0][0] == 0 and quadrature("eleuther", 5)[0][-1] == 1


# -- independent oracles ------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize(
    ("ours", "captum_method"),
    [
        ("riemann_right", "riemann_right"),
        ("trapezoid", "riemann_trapezoid"),
        ("gauss_legendre", "gausslegendre"),
    ],
)
def test_reference_equals_captum_layer_integrated_gradients(arch: str, ours: str, captum_method: str) -> None:
    captum_attr = oracle("captum.attr")
    lm = tiny(arch)
    encoded = lm.encode(*ITEMS[3])  # multi-token answer: first target
    pos, token = encoded.targets[0]
    layer, steps = 1, 6
    engine = ReferenceEngine(lm)
    clean = engine.clean([encoded.input_ids], [encoded.targets], keep=True)
    a_bar = clean.acts[0][0][layer]
    baseline = torch.randn_like(a_bar) * a_bar.abs().mean()  # a non-zero baseline (as AMIG uses)

    problems = Problems(
        seq=torch.tensor([0]),
        position=torch.tensor([pos]),
        token=torch.tensor([token]),
        layer=torch.tensor([layer]),
        base=baseline[None],
        diff=(a_bar - baseline)[None],
    )
    alphas, weights = quadrature(ours, steps)
    grad_sum, _ = engine.integrate(problems, alphas, weights, "prob", need_f0=False)
    mine = (a_bar - baseline) * grad_sum[0]

    # captum integrates over an identity "probe" whose output is the target-position activation; its input
    # is gate·ā + (1-gate)·a', so captum's own baseline (gate 0) and input (gate 1) give a' and ā.
    probe = torch.nn.Identity()
    ids = torch.tensor([encoded.input_ids])

    def forward(gate: torch.Tensor) -> torch.Tensor:
        value = probe(baseline + gate * (a_bar - baseline))  # [B, d_ff]

        def put(h: torch.Tensor) -> torch.Tensor:
            h = h.clone()
            h[:, pos, :] = value
            return h

        with edit_activations(lm.sites.out_projs[layer], put):
            logits = lm.model(input_ids=ids.expand(value.shape[0], -1)).logits[:, pos]
        return torch.softmax(logits.float(), -1)[:, token]

    lig = captum_attr.LayerIntegratedGradients(forward, probe, multiply_by_inputs=True)
    theirs = lig.attribute(
        torch.ones(1, 1),
        baselines=torch.zeros(1, 1),
        n_steps=steps,
        method=captum_method,
        attribute_to_layer_input=False,
        internal_batch_size=steps,
    )[0]
    if ours == "trapezoid":
        # captum's riemann_trapezoid uses step 1/m with halved ends (weights sum to (m-1)/m); the true
        # trapezoid rule on m nodes uses step 1/(m-1). Same nodes, weights differ by that constant factor.
        mine = mine * (steps - 1) / steps
    assert rel_diff(mine, theirs) <= 1e-6  # measured <= 2.7e-7


def test_bert_scores_equal_eleutherai_knowledge_neurons() -> None:
    kn = oracle("knowledge_neurons")
    lm = tiny("bert")
    prompts = [("The capital of France is [Y].", "Paris"), ("Berlin is located in [Y].", "Germany")]
    for query, answer in prompts:
        assert (
            len(lm.encode(query, answer).targets) == 1
        )  # EleutherAI supports single-token BERT targets only
        engine = kn.KnowledgeNeurons(lm.model, lm.tokenizer, model_type="bert", device="cpu")
        theirs = engine.get_scores(
            query.replace("[Y]", "[MASK]"), answer, batch_size=10, steps=20, pbar=False
        )
        ours = attribute(lm, query, answer, steps=20, quadrature="eleuther")
        assert rel_diff(ours, theirs) <= 1e-6  # measured <= 2.4e-7


@pytest.mark.parametrize("arch", ["bert", "xlm-roberta"])
def test_masked_own_block_shortcut_and_its_fallback(arch: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Masked rows run their own block once per sequence (only the target's FFN output differs) and only the
    target in the last block; the full replay gives the same scores, and a block that cannot broadcast a
    sequence's clean tensors to its rows (simulated: it refuses an output batch other than its input's) makes
    the engine fall back to it, still equal to the reference engine."""
    from knlight.neurons import fast_engine

    lm = tiny(arch)
    kwargs = dict(steps=4, quadrature_name="riemann_right")
    flags: list[bool] = []
    integrate = fast_engine.FastEngine.integrate

    def recording(self, *args, **kw):  # type: ignore[no-untyped-def]
        out = integrate(self, *args, **kw)
        flags.append(self.own_block_shortcut)
        return out

    monkeypatch.setattr(fast_engine.FastEngine, "integrate", recording)
    shortcut = attribute_batch(lm, ITEMS, engine="fast", chunk_rows=24, **kwargs)
    assert flags and all(flags)  # the shortcut was taken in every sweep
    ref = attribute_batch(lm, ITEMS, engine="reference", **kwargs)
    assert rel_diff(shortcut.scores, ref.scores) <= 1e-5

    def strict(block: torch.nn.Module, args: tuple, out: object) -> None:
        hidden = out[0] if isinstance(out, tuple) else out
        if hidden.shape[0] != args[0].shape[0]:
            raise RuntimeError("this block does not broadcast")

    handles = [block.register_forward_hook(strict) for block in lm.sites.blocks]
    flags.clear()
    try:
        replayed = attribute_batch(lm, ITEMS, engine="fast", chunk_rows=24, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    assert flags and not any(flags)  # fell back to the full replay
    assert rel_diff(replayed.scores, shortcut.scores) <= 1e-6
