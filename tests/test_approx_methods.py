"""The labelled approximations of IG (``method``): each against an independent hand-written autograd computation
on plain model forwards (full logits, no knlight forward code), on causal and masked tiny models; the exact
relation between ``grad_x_act`` and one-step IG; options, labels and what a predict run records."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from conftest import oracle

from knlight import attribute, attribute_batch, load_lm
from knlight.cli import main
from knlight.errors import ConfigError
from knlight.lm.hooks import edit_activations
from knlight.lm.prompts import EncodedQuery
from knlight.neurons.ig import IGOptions
from knlight.selection.summary import summarize

pytestmark = pytest.mark.usefixtures("one_thread")

# Multi-token answers on purpose: every target token is its own target position (causal: gold prefix forced).
ITEMS = [("The capital of France is [Y].", "Paris"), ("Rome is the capital of [Y] today.", "Italy and more")]
ARCHS = ("gpt2", "gemma3_text", "bert")  # causal (learned positions), causal (rotary, sliding window), masked


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def gold_objective(lm: object, ids: torch.Tensor, position: int, token: int, objective: str) -> torch.Tensor:
    """F per batch row from the model's own full logits (softcap and all): P(token) or log P(token)."""
    logits = lm.model(input_ids=ids).logits[:, position].float()  # type: ignore[attr-defined]
    log_p = torch.log_softmax(logits, dim=-1)[:, token]
    return log_p.exp() if objective == "prob" else log_p


def clean_activation(lm: object, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """``h_layer`` ``[seq, d_ff]`` of the clean model (a plain forward with a capturing hook)."""
    store: list[torch.Tensor] = []

    def keep(h: torch.Tensor) -> torch.Tensor:
        store.append(h.detach()[0])
        return h

    with torch.no_grad(), edit_activations(lm.sites.out_projs[layer], keep):  # type: ignore[attr-defined]
        lm.model(input_ids=ids)  # type: ignore[attr-defined]
    return store[0]


def by_hand(
    lm: object,
    encoded: EncodedQuery,
    layers: Sequence[int],
    path_value: Callable[[int, int, torch.Tensor], torch.Tensor],
    objective: str,
) -> torch.Tensor:
    """``Σ_targets ā_l[p] · ∂F/∂a_l[p]`` with ``h_l[p] <- path_value(layer, p, ā_l[p])`` (a leaf), one layer
    at a time, in a plain forward (the layers above compute their activations from the replaced one)."""
    ids = torch.tensor([encoded.input_ids])
    out = torch.zeros(len(layers), lm.d_ff)  # type: ignore[attr-defined]
    for slot, layer in enumerate(layers):
        clean = clean_activation(lm, ids, layer)
        for position, token in encoded.targets:
            leaf = path_value(layer, position, clean[position]).clone().requires_grad_(True)

            def put(h: torch.Tensor, leaf: torch.Tensor = leaf, position: int = position) -> torch.Tensor:
                h = h.clone()
                h[0, position] = leaf
                return h

            with edit_activations(lm.sites.out_projs[layer], put):  # type: ignore[attr-defined]
                value = gold_objective(lm, ids, position, token, objective)
            (grad,) = torch.autograd.grad(value.sum(), leaf)
            out[slot] += clean[position] * grad
    return out


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("objective", ["prob", "log_prob"])
def test_grad_x_act_equals_the_autograd_gradient_at_the_captured_activation(
    arch: str, objective: str
) -> None:
    lm = load_lm(f"tiny:{arch}")
    layers = list(range(lm.num_layers))
    got = attribute_batch(lm, ITEMS, method="grad_x_act", objective=objective)
    assert got.method == "grad_x_act"
    for i, (query, answer) in enumerate(ITEMS):
        encoded = lm.encode(query, answer)
        # The captured activation itself as the leaf: the gradient of the clean forward at the clean point.
        expected = by_hand(lm, encoded, layers, lambda layer, p, a: a, objective)
        assert rel_diff(got.scores[i], expected) <= 1e-5
    assert torch.isnan(got.residual).all() and torch.isnan(got.delta).all()  # no per-layer path to complete


@pytest.mark.parametrize("arch", ["gpt2", "gemma3_text", "llama"])
@pytest.mark.parametrize("chunk_rows", [None, 3])
def test_grad_x_act_over_cached_prefixes_of_different_lengths_equals_the_oracle(
    arch: str, chunk_rows: int | None
) -> None:
    """Causal rows run only from their query's first target position on, over left-padded prefix caches: a
    prompt longer than the tiny Gemma's sliding window (8) beside short ones, chunks that split a query."""
    items = [*ITEMS, ("In the year of the long winter the old capital of the land was [Y].", "Rome of kings")]
    lm = load_lm(f"tiny:{arch}")
    starts = [min(p for p, _ in lm.encode(*item).targets) for item in items]
    assert min(starts) > 0 and len(set(starts)) > 1 and max(starts) > 8  # padded prefixes, all cached
    got = attribute_batch(lm, items, method="grad_x_act", objective="log_prob", chunk_rows=chunk_rows)
    for i, item in enumerate(items):
        expected = by_hand(lm, lm.encode(*item), range(lm.num_layers), lambda layer, p, a: a, "log_prob")
        assert rel_diff(got.scores[i], expected) <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_steps1_zero_equals_the_autograd_gradient_at_the_zeroed_activation(arch: str) -> None:
    lm = load_lm(f"tiny:{arch}")
    for engine in ("fast", "reference"):
        got = attribute_batch(lm, ITEMS, method="steps1_zero", engine=engine)
        assert got.method == "steps1_zero"
        for i, (query, answer) in enumerate(ITEMS):
            encoded = lm.encode(query, answer)
            # Only layer l's target activation is zeroed (EasyEdit patches one layer per get_scores_for_layer).
            expected = by_hand(
                lm, encoded, range(lm.num_layers), lambda layer, p, a: torch.zeros_like(a), "prob"
            )
            assert rel_diff(got.scores[i], expected) <= 1e-5
        # The completeness residual of the one-node rule is reported (it is large: one node is a poor integral).
        assert torch.isfinite(got.residual).all() and float(got.residual.abs().max()) > 0


def test_steps1_zero_equals_eleutherai_get_scores_with_steps_1() -> None:
    """EasyEdit's knowledge-neuron code is EleutherAI's (vendored): ``get_scores(steps=1)`` is the same rule."""
    kn = oracle("knowledge_neurons")
    lm = load_lm("tiny:bert")
    engine = kn.KnowledgeNeurons(lm.model, lm.tokenizer, model_type="bert", device="cpu")
    for query, answer in [
        ("The capital of France is [Y].", "Paris"),
        ("Berlin is located in [Y].", "Germany"),
    ]:
        assert (
            len(lm.encode(query, answer).targets) == 1
        )  # EleutherAI supports single-token BERT targets only
        theirs = engine.get_scores(query.replace("[Y]", "[MASK]"), answer, batch_size=1, steps=1, pbar=False)
        ours = attribute(lm, query, answer, method="steps1_zero")
        assert rel_diff(ours, theirs) <= 1e-5


def joint_by_hand(lm: object, encoded: EncodedQuery, layers: Sequence[int], steps: int) -> torch.Tensor:
    """Zero-baseline right-Riemann IG along the joint path: every listed layer's target activation ``α·ā_l``."""
    ids = torch.tensor([encoded.input_ids])
    clean = {layer: clean_activation(lm, ids, layer) for layer in layers}
    out = torch.zeros(len(layers), lm.d_ff)  # type: ignore[attr-defined]
    for position, token in encoded.targets:
        for k in range(1, steps + 1):
            leaves = [(k / steps * clean[layer][position]).requires_grad_(True) for layer in layers]
            with ExitStack() as stack:
                for layer, leaf in zip(layers, leaves):

                    def put(
                        h: torch.Tensor, leaf: torch.Tensor = leaf, position: int = position
                    ) -> torch.Tensor:
                        h = h.clone()
                        h[0, position] = leaf
                        return h

                    stack.enter_context(edit_activations(lm.sites.out_projs[layer], put))  # type: ignore[attr-defined]
                value = gold_objective(lm, ids, position, token, "prob")
            grads = torch.autograd.grad(value.sum(), leaves)
            for slot, layer in enumerate(layers):
                out[slot] += clean[layer][position] * grads[slot] / steps
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_joint_ig_equals_a_hand_written_joint_path(arch: str) -> None:
    lm = load_lm(f"tiny:{arch}")
    for layers in (list(range(lm.num_layers)), [0, lm.num_layers - 1]):
        got = attribute_batch(lm, ITEMS, method="joint_ig", steps=4, layers=layers, chunk_rows=6)
        assert got.method == "joint_ig" and got.layers == layers
        for i, (query, answer) in enumerate(ITEMS):
            # Full-sequence forwards here; the causal method runs single rows over the prefix's KV cache.
            expected = joint_by_hand(lm, lm.encode(query, answer), layers, steps=4)
            assert rel_diff(got.scores[i], expected) <= 1e-5


def test_joint_ig_is_complete_over_all_layers_together() -> None:
    """Σ over every layer and neuron = F(ā) - F(all attributed layers at 0) (a fine quadrature)."""
    lm = load_lm("tiny:llama")
    query, answer = ITEMS[0]
    encoded = lm.encode(query, answer)
    (position, token), ids = encoded.targets[0], torch.tensor([encoded.input_ids])
    assert len(encoded.targets) == 1
    got = attribute_batch(lm, [encoded], method="joint_ig", steps=24, quadrature_name="gauss_legendre")
    with ExitStack() as stack, torch.no_grad():
        for layer in range(lm.num_layers):

            def zero(h: torch.Tensor) -> torch.Tensor:
                h = h.clone()
                h[0, position] = 0
                return h

            stack.enter_context(edit_activations(lm.sites.out_projs[layer], zero))
        f_zero = gold_objective(lm, ids, position, token, "prob")[0]
    delta = float(got.prob[0] - f_zero)
    assert abs(float(got.scores.sum()) - delta) <= 1e-4 * abs(delta)
    # The sum is shared by the layers: there is no per-layer delta, so no per-layer residual is claimed.
    assert torch.isnan(got.residual).all()


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_grad_x_act_is_one_step_right_riemann_ig_and_nothing_else(arch: str) -> None:
    """α = 1 is the clean point, so one right-Riemann step is gradient × (ā - a') for every baseline and
    aggregation (exact in real arithmetic); a midpoint step or the zero point are other numbers."""
    lm = load_lm(f"tiny:{arch}")
    for baseline, aggregation in (("zero", "paper"), ("amig", "paper"), ("amig", "code")):
        kw = dict(baseline=baseline, aggregation=aggregation, objective="log_prob")
        gxa = attribute_batch(lm, ITEMS, method="grad_x_act", **kw).scores
        one_step = attribute_batch(lm, ITEMS, steps=1, quadrature_name="riemann_right", **kw).scores
        assert rel_diff(gxa, one_step) <= 1e-5
        midpoint = attribute_batch(lm, ITEMS, steps=1, quadrature_name="gauss_legendre", **kw).scores
        assert rel_diff(gxa, midpoint) > 1e-3
    zero_point = attribute_batch(lm, ITEMS, method="steps1_zero", objective="log_prob").scores
    gxa = attribute_batch(lm, ITEMS, method="grad_x_act", objective="log_prob").scores
    assert rel_diff(gxa, zero_point) > 1e-3


def test_method_option_is_validated_and_passed_on() -> None:
    assert IGOptions().method == "ig"  # nothing approximate is the default
    assert IGOptions(method="grad_x_act").kwargs()["method"] == "grad_x_act"
    with pytest.raises(ConfigError, match=r"ig\.method='atp'.*grad_x_act"):
        IGOptions(method="atp")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"ig\.method=steps1_zero.*ig\.baseline"):
        IGOptions(method="steps1_zero", baseline="amig")
    lm = load_lm("tiny:gpt2")
    with pytest.raises(ValueError, match="unknown method"):
        attribute_batch(lm, ITEMS, method="atp")
    with pytest.raises(ValueError, match="baseline 'zero'"):
        attribute_batch(lm, ITEMS, method="steps1_zero", baseline="amig")
    assert attribute_batch(lm, ITEMS[:1], steps=2).method == "ig"


def test_predict_records_the_method_in_every_result_file_and_refuses_to_resume_with_another(
    tmp_path: Path, tiny_args: Callable[[Path], list[str]]
) -> None:
    """The method set in a config file reaches the task; run.json, every line, summary.json, the neuron file and
    ``knlight summary`` state it; resuming the folder with exact IG is refused (the run fingerprint)."""
    out = tmp_path / "attributions"
    config = tmp_path / "approx.yaml"
    config.write_text("model:\n  init_args:\n    ig:\n      method: grad_x_act\n", encoding="utf-8")
    writer = ["--trainer.callbacks.init_args.output_dir", str(out)]
    main([
        *tiny_args(tmp_path), "--config", str(config), *writer,
        "--trainer.callbacks+=knlight.callbacks.SelectNeurons",
        "--trainer.callbacks.init_args.output", str(tmp_path / "neurons.json"),
    ])  # fmt: skip
    run = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert run["hparams"]["method"] == "grad_x_act"
    neurons = json.loads((tmp_path / "neurons.json").read_text(encoding="utf-8"))
    assert neurons["method"]["attribution"]["method"] == "grad_x_act"
    lines = [
        json.loads(line) for line in (out / "attributions.jsonl").read_text(encoding="utf-8").splitlines()
    ]
    assert lines and all(line["method"] == "grad_x_act" for line in lines)
    assert all(r is None for line in lines for r in line["residual"])  # no completeness residual
    assert any(line["neurons"] for line in lines)
    assert json.loads((out / "summary.json").read_text(encoding="utf-8"))["method"] == "grad_x_act"
    assert summarize(out).splitlines()[0] == "method: grad_x_act (an approximation of IG, not exact)"
    before = (out / "attributions.jsonl").read_bytes()
    with pytest.raises(RuntimeError, match=r"different settings \(hparams\.method;"):
        main([*tiny_args(tmp_path), *writer])  # the default method (exact IG) on the approximate results
    assert (out / "attributions.jsonl").read_bytes() == before


def test_exact_ig_is_what_predict_records_by_default(
    tmp_path: Path, tiny_args: Callable[[Path], list[str]]
) -> None:
    out = tmp_path / "attributions"
    main([*tiny_args(tmp_path), "--data.init_args.batch_size", "14", "--trainer.callbacks.init_args.output_dir",
          str(out)])  # fmt: skip
    assert json.loads((out / "run.json").read_text(encoding="utf-8"))["hparams"]["method"] == "ig"
    lines = (out / "attributions.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines and all(json.loads(line)["method"] == "ig" for line in lines)
    assert json.loads((out / "summary.json").read_text(encoding="utf-8"))["method"] == "ig"
    assert summarize(out).splitlines()[0] == "method: ig"


def test_a_run_from_before_the_method_was_recorded_resumes_with_exact_ig_only(
    tmp_path: Path, tiny_args: Callable[[Path], list[str]]
) -> None:
    """A folder whose run.json has no ``hparams.method`` (knlight before ig.method: exact IG) resumes with exact
    IG — nothing is recomputed — and is refused for an approximation."""
    out = tmp_path / "attributions"
    writer = ["--trainer.callbacks.init_args.output_dir", str(out)]
    main([*tiny_args(tmp_path), *writer])
    run_file = out / "run.json"
    run = json.loads(run_file.read_text(encoding="utf-8"))
    del run["hparams"]["method"]
    run_file.write_text(json.dumps(run), encoding="utf-8")
    before = (out / "attributions.jsonl").read_bytes()
    main([*tiny_args(tmp_path), *writer])  # exact IG: resumes, every item already done
    assert (out / "attributions.jsonl").read_bytes() == before
    with pytest.raises(RuntimeError, match=r"different settings \(hparams\.method;"):
        main([*tiny_args(tmp_path), *writer, "--model.init_args.ig.method", "grad_x_act"])
    assert (out / "attributions.jsonl").read_bytes() == before
