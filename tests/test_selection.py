"""Selection rules on hand-made scores, DKN on a hand-made model, the selection command on hand-made files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import MethodType, SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from knlight.lm import LanguageModel
from knlight.lm.prompts import EncodedQuery
from knlight.neurons.neuron_file import read_neuron_file
from knlight.neurons.selection import (
    adaptive_refine,
    coarse_mask,
    degenerate_neurons,
    language_independent,
    mask_to_neurons,
    refine_by_sharing,
    top_k_mask,
    uncertainty_scores,
)
from knlight.select import main  # the python -m alias of knlight select
from knlight.selection import (
    DknOptions,
    KnOptions,
    LiknOptions,
    SelectionError,
    UncertaintyOptions,
    run_selection,
)
from knlight.selection.options import KnownOptions

# -- a hand-made model whose neurons' effects are known ------------------------------------------------------


class _Block(nn.Module):
    def __init__(self, width: int, d_ff: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, d_ff)  # weight 0, bias 1: every neuron fires with activation 1 everywhere
        self.out = nn.Linear(d_ff, width, bias=False)  # column i: what neuron i writes into the logits
        nn.init.zeros_(self.fc.weight)
        nn.init.ones_(self.fc.bias)
        nn.init.zeros_(self.out.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(torch.relu(self.fc(x)))


class ToyModel(nn.Module):
    """Residual stream = logits (identity head, zero embeddings); neuron (l, i) adds ``out[l][:, i]``."""

    def __init__(self, num_layers: int, d_ff: int, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, vocab)
        nn.init.zeros_(self.embed.weight)
        self.layers = nn.ModuleList(_Block(vocab, d_ff) for _ in range(num_layers))

    @property
    def base_model(self) -> ToyModel:
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: object):
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x)
        return SimpleNamespace(last_hidden_state=x)


def toy_lm(
    writes: dict[tuple[int, int], dict[int, float]], num_layers: int = 2, d_ff: int = 6, vocab: int = 8
):
    """A toy LM: ``writes[(layer, neuron)] = {token: logit added}``; answer: token 0 at position 2."""
    model = ToyModel(num_layers, d_ff, vocab)
    with torch.no_grad():
        for (layer, neuron), column in writes.items():
            for token, amount in column.items():
                model.layers[layer].out.weight[token, neuron] = amount
    sites = SimpleNamespace(
        out_projs=[b.out for b in model.layers], head=nn.Identity(), logit_softcap=None, num_layers=num_layers
    )
    lm = SimpleNamespace(
        model=model, sites=sites, num_layers=num_layers, d_ff=d_ff, pad_token_id=vocab - 1,
        device=torch.device("cpu"), masked=True,
    )  # fmt: skip
    # The shared forwards (padding, LM head) of a real LanguageModel, on the toy's attributes.
    lm.pad, lm.head = MethodType(LanguageModel.pad, lm), MethodType(LanguageModel.head, lm)
    return lm


QUERY = EncodedQuery(input_ids=(1, 2, 3), targets=((2, 0),), words=())
Y, COMP = 0, 1
A, B, C, D, E = (1, 0), (1, 1), (1, 2), (1, 3), (0, 4)


def test_dkn_finds_the_redundant_pair_and_skips_the_essential_neuron() -> None:
    # a and b each carry y alone (+10 saturates the softmax); c holds down a competitor that d pushes up (c is
    # essential); e writes nothing.
    lm = toy_lm({A: {Y: 10}, B: {Y: 10}, C: {COMP: -30}, D: {COMP: 30}})
    result = degenerate_neurons(lm, [QUERY, QUERY], [A, B, C, D, E], t_low=0.2, t_high=0.25)
    assert result.pairs == [(A, B)]
    assert result.candidates == [A, B, D, E]
    assert result.single_drop[C] == pytest.approx(1.0, abs=1e-3)
    assert max(result.single_drop[n] for n in (A, B, D, E)) < 1e-3
    assert result.sets == []


def test_dkn_greedy_growth_finds_a_minimal_triple() -> None:
    # Any one of f, g, h keeps P(y) high (15 → 10 → 5 logits); all three are needed to lose it.
    f, g, h, z = (1, 0), (1, 1), (0, 2), (0, 3)
    lm = toy_lm({f: {Y: 5}, g: {Y: 5}, h: {Y: 5}})
    result = degenerate_neurons(lm, [QUERY], [f, g, h, z], t_low=0.2, t_high=0.25, grow=True)
    assert result.pairs == []
    assert [sorted(s) for s in result.sets] == [sorted([f, g, h])]
    assert degenerate_neurons(lm, [QUERY], [f, g, h, z], grow=False).sets == []


def test_dkn_ignores_items_with_zero_probability() -> None:
    lm = toy_lm({A: {Y: 10}, B: {Y: 10}})
    zero = EncodedQuery(input_ids=(1, 2, 3), targets=((2, 5),), words=())
    with torch.no_grad():
        lm.model.layers[1].out.weight[5, 5] = -math.inf  # P(token 5) = 0 at every position
    result = degenerate_neurons(lm, [QUERY, zero], [A, B])
    assert result.pairs == [(A, B)]


# -- thresholds, sharing, adaptive p ------------------------------------------------------------------------


def test_coarse_mask_is_strict_and_empty_without_positive_scores() -> None:
    scores = torch.tensor([[1.0, 0.2, 0.2000001, -3.0], [0.5, 0.0, 0.2, 0.1]])
    assert mask_to_neurons(coarse_mask(scores, 0.2)) == [
        (0, 0),
        (0, 2),
        (1, 0),
    ]  # 0.2 == τ·max is not selected
    assert not coarse_mask(-scores.abs(), 0.2).any()
    assert not coarse_mask(torch.zeros(2, 4), 0.0).any()
    with pytest.raises(ValueError, match="NaN"):
        coarse_mask(torch.tensor([[math.nan, 1.0]]), 0.2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        coarse_mask(scores, 1.5)


def test_top_k_breaks_ties_by_position_and_respects_within() -> None:
    scores = torch.tensor([[0.5, 0.9, 0.9], [0.9, 0.1, 0.0]])
    assert mask_to_neurons(top_k_mask(scores, 2)) == [(0, 1), (0, 2)]
    assert mask_to_neurons(top_k_mask(scores, 2, within=scores < 0.8)) == [(0, 0), (1, 1)]
    assert not top_k_mask(scores, 3, within=torch.zeros_like(scores, dtype=torch.bool)).any()
    assert mask_to_neurons(top_k_mask(scores, 3), scores) == [(0, 1), (0, 2), (1, 0)]


def _coarse(
    counts: dict[tuple[int, int], int], queries: int = 10, shape: tuple[int, int] = (2, 8)
) -> torch.Tensor:
    """Coarse masks ``[queries, *shape]`` where neuron n is coarse in its first ``counts[n]`` queries."""
    coarse = torch.zeros(queries, *shape, dtype=torch.bool)
    for (layer, index), count in counts.items():
        coarse[:count, layer, index] = True
    return coarse


def test_refine_by_sharing_counts_queries_and_never_keeps_unseen_neurons() -> None:
    coarse = _coarse({(0, 0): 10, (0, 1): 7, (1, 2): 6, (1, 3): 1})
    assert mask_to_neurons(refine_by_sharing(coarse, 0.7)) == [(0, 0), (0, 1)]
    assert mask_to_neurons(refine_by_sharing(coarse, 0.6)) == [(0, 0), (0, 1), (1, 2)]
    assert int(refine_by_sharing(coarse, 0.0).sum()) == 4  # p = 0 still needs one query
    with pytest.raises(ValueError, match="Q >= 1"):
        refine_by_sharing(torch.zeros(0, 2, 2, dtype=torch.bool), 0.5)


def test_adaptive_p_lowers_until_two_neurons() -> None:
    coarse = _coarse({(0, 0): 9, (0, 1): 5, (1, 2): 4, (1, 3): 2})
    mask, p = adaptive_refine(coarse, p=0.7)
    assert p == pytest.approx(0.5) and mask_to_neurons(mask) == [(0, 0), (0, 1)]


def test_adaptive_p_raises_until_at_most_five_neurons() -> None:
    coarse = _coarse({**{(0, i): 8 for i in range(6)}, (1, 0): 10, (1, 1): 9, (1, 2): 9})
    mask, p = adaptive_refine(coarse, p=0.7)
    assert p == pytest.approx(0.85) and mask_to_neurons(mask) == [(1, 0), (1, 1), (1, 2)]  # 8.5 queries


def test_adaptive_p_takes_the_closest_count_when_the_range_is_unreachable() -> None:
    # Ties: 6 neurons share every query; no p separates them.
    mask, p = adaptive_refine(_coarse({(0, i): 10 for i in range(6)}), p=0.7)
    assert int(mask.sum()) == 6 and p == pytest.approx(0.7)
    # A single coarse neuron: the best is 1 neuron (smallest p on equal distance), never unseen neurons.
    mask, p = adaptive_refine(_coarse({(1, 7): 3}), p=0.7)
    assert mask_to_neurons(mask) == [(1, 7)] and 0 < p <= 0.3 + 1e-9
    mask, _ = adaptive_refine(_coarse({}), p=0.7)
    assert not mask.any()


# -- uncertainty-aware aggregation and LIKN -----------------------------------------------------------------


def test_lcb_ranks_a_consistent_neuron_above_a_one_query_spike() -> None:
    scores = torch.zeros(5, 2, 4)
    scores[:, 0, 1] = 0.6  # consistent: 0.6 in every query
    scores[0, 1, 3] = 1.0  # spike: the highest score of one query only
    scores[1:, 1, 2] = 0.3  # filler so every query has a positive maximum
    mean = uncertainty_scores(scores, kappa=0.0)
    lcb = uncertainty_scores(scores, kappa=1.0)
    # Normalised per query: consistent [0.6, 1, 1, 1, 1] (LCB 0.92 − 0.16), spike [1, 0, 0, 0, 0] (0.2 − 0.4).
    assert float(lcb[0, 1]) == pytest.approx(0.76, abs=1e-6)
    assert float(lcb[1, 3]) == pytest.approx(-0.2, abs=1e-6)
    assert (1, 3) in mask_to_neurons(coarse_mask(mean, 0.2))  # the plain mean keeps the spike ...
    assert mask_to_neurons(coarse_mask(lcb, 0.2), lcb) == [(0, 1), (1, 2)]  # ... the bound does not


def test_lcb_across_languages_penalises_a_neuron_missing_in_one_language() -> None:
    scores = torch.zeros(4, 1, 3)
    scores[:, 0, 0] = torch.tensor([1.0, 1.0, 1.0, 1.0])  # high in en and de
    scores[:, 0, 1] = torch.tensor([1.0, 1.0, 0.0, 0.0])  # high in en only (both en queries agree)
    scores[2:, 0, 2] = 0.5
    languages = ["en", "en", "de", "de"]
    lcb = uncertainty_scores(scores, kappa=1.0, languages=languages)
    pooled = uncertainty_scores(scores, kappa=0.0)
    assert float(lcb[0, 0]) == pytest.approx(1.0)
    assert float(lcb[0, 1]) == pytest.approx(0.5 - 0.5)  # mean over languages 0.5, std 0.5
    assert float(pooled[0, 1]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="2 languages given for 4 queries"):
        uncertainty_scores(scores, languages=["en", "de"])


def test_lcb_weights_follow_the_model_confidence() -> None:
    scores = torch.zeros(2, 1, 2)
    scores[0, 0, 0], scores[1, 0, 1] = 1.0, 1.0
    lcb = uncertainty_scores(scores, kappa=0.0, weights=torch.tensor([0.9, 0.1]))
    assert lcb[0, 0] == pytest.approx(0.9) and lcb[0, 1] == pytest.approx(0.1)
    with pytest.raises(ValueError, match="non-negative"):
        uncertainty_scores(scores, weights=torch.tensor([-1.0, 2.0]))


def test_language_independent_all_or_k_of_l() -> None:
    def mask(*neurons: tuple[int, int]) -> torch.Tensor:
        m = torch.zeros(2, 4, dtype=torch.bool)
        for n in neurons:
            m[n] = True
        return m

    masks = {"en": mask((1, 0), (1, 1), (0, 2)), "de": mask((1, 0), (1, 1)), "zh": mask((1, 0), (0, 2))}
    assert mask_to_neurons(language_independent(masks)) == [(1, 0)]
    assert mask_to_neurons(language_independent(masks, 2)) == [(0, 2), (1, 0), (1, 1)]
    assert mask_to_neurons(language_independent(masks, 1)) == [(0, 2), (1, 0), (1, 1)]
    with pytest.raises(ValueError, match=r"1\.\.3"):
        language_independent(masks, 4)
    assert not language_independent({"en": mask(), "de": mask((1, 0))}).any()  # an empty language empties it


# -- the selection command on hand-made predict output -----------------------------------------------------


def _line(uuid: str, language: str, query_id: int, neurons: list, query: str | None = None) -> str:
    record = {"uuid": uuid, "language": language, "relation": "P36", "query_id": query_id,
              "query": query or f"q{query_id} [Y]", "answer": "Paris", "prob": 0.5, "neurons": neurons,
              "residual": [0.0, 0.0], "layer_mass": [0.5, 0.5]}  # fmt: skip
    return json.dumps(record)


def predict_output(root: Path, lines: list[str], scores: dict[str, torch.Tensor] | None = None) -> Path:
    """A folder as ``knlight predict`` writes it (2 layers × 4 neurons, τ = 0.2)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "attributions.jsonl").write_text("\n".join(lines) + "\n", "utf-8")
    hparams = {"model": "tiny:none", "threshold": 0.2, "language_thresholds": None, "top_k": None}
    (root / "run.json").write_text(json.dumps({"hparams": hparams}), "utf-8")
    if scores is not None:
        save_file(scores, str(root / "scores.safetensors"), {"format": "dense", "layers": "[0, 1]"})
    return root


# Fact F1: en has 3 queries, de 2; fact F2: en only.
F1_EN = [[[1, 2, 1.0], [0, 1, 0.5]], [[1, 2, 0.9], [0, 3, 0.4]], [[1, 2, 0.8], [0, 1, 0.3], [0, 3, 0.7]]]
F1_DE = [[[1, 2, 1.0], [0, 3, 0.6]], [[0, 3, 1.0], [1, 2, 0.5]]]
F2_EN = [[[0, 0, 1.0]], [[0, 0, 1.0], [1, 1, 0.9]]]


def _lines() -> list[str]:
    return [
        *(_line("F1", "en", q, n) for q, n in enumerate(F1_EN)),
        *(_line("F1", "de", q, n) for q, n in enumerate(F1_DE)),
        *(_line("F2", "en", q, n) for q, n in enumerate(F2_EN)),
    ]


def _dense(uuid: str, language: str, query_id: int, neurons: list) -> tuple[str, torch.Tensor]:
    dense = torch.zeros(2, 4)
    for layer, index, score in neurons:
        dense[layer, index] = score
    return json.dumps([uuid, language, query_id], separators=(",", ":")) + "/scores", dense


def _scores() -> dict[str, torch.Tensor]:
    out = {}
    for uuid, language, rows in (("F1", "en", F1_EN), ("F1", "de", F1_DE), ("F2", "en", F2_EN)):
        out.update(_dense(uuid, language, q, n) for q, n in enumerate(rows))
    return out


def test_selection_per_language_likn_and_uncertainty(tmp_path: Path) -> None:
    run = predict_output(tmp_path / "attr", _lines(), _scores())
    out = tmp_path / "neurons.json"
    result = run_selection(
        str(run), str(out), num_layers=2, d_ff=4,
        kn=KnOptions(p=0.7, adaptive=False), likn=LiknOptions(min_languages=None),
        uncertainty=UncertaintyOptions(enabled=True, kappa=1.0, threshold=0.3, top_k=None),
    )  # fmt: skip
    f1, f2 = result.facts["F1"], result.facts["F2"]
    # en: (1, 2) is coarse in 3 of 3 queries, (0, 1) and (0, 3) in 2 < 0.7·3; de: both in 2 of 2, ordered by
    # mean normalised score ((0, 3): 0.8, (1, 2): 0.75).
    assert f1.languages == {"en": [(1, 2)], "de": [(0, 3), (1, 2)]}
    assert f1.p == {"en": 0.7, "de": 0.7}
    assert f1.language_independent == [(1, 2)]
    assert (
        f2.languages == {"en": [(0, 0)]} and f2.language_independent == []
    )  # no de queries: not in every language
    # LCB: (1, 2) 0.5 (en 1.0 ± 0, de 0.75 ± 0.25), (0, 3) 0.08: only (1, 2) passes 0.3 · max.
    assert f1.uncertainty == [(1, 2)]
    assert read_neuron_file(out, num_layers=2, d_ff=4).facts["F1"].languages == f1.languages
    assert result.method["kn"]["p"] == 0.7 and result.method["languages"] == ["de", "en"]


def test_selection_adaptive_p_and_re_thresholding(tmp_path: Path) -> None:
    run = predict_output(tmp_path / "attr", _lines())
    kn = KnOptions(threshold=0.55, adaptive=True, min_neurons=1, max_neurons=1)
    result = run_selection(str(run), None, num_layers=2, d_ff=4, kn=kn, likn=LiknOptions(min_languages=1))
    # τ = 0.55: en keeps (1, 2) in 3 queries and (0, 3) in 1; de keeps (0, 3) in 2 and (1, 2) in 1.
    assert result.facts["F1"].languages == {"en": [(1, 2)], "de": [(0, 3)]}
    assert result.facts["F1"].language_independent == [(0, 3), (1, 2)]  # in at least 1 language
    with pytest.raises(SelectionError, match=r"below the predict run's τ=0.2.*save_scores true"):
        run_selection(str(run), None, num_layers=2, d_ff=4, kn=KnOptions(threshold=0.1))


def test_uncertainty_without_scores_says_which_option_to_turn_on(tmp_path: Path) -> None:
    run = predict_output(tmp_path / "attr", _lines())
    with pytest.raises(
        SelectionError, match=r"return_scores true --trainer\.callbacks\.init_args\.save_scores true"
    ):
        run_selection(str(run), None, num_layers=2, d_ff=4, uncertainty=UncertaintyOptions(enabled=True))


def test_nan_attribution_is_an_error_naming_file_line_and_item(tmp_path: Path) -> None:
    lines = _lines()
    lines[3] = _line("F1", "de", 0, [[1, 2, None]])  # the writer stores NaN as null
    run = predict_output(tmp_path / "attr", lines)
    with pytest.raises(
        SelectionError, match=r"attributions\.jsonl:4: item uuid='F1' language='de' query_id=0.*NaN"
    ):
        run_selection(str(run), None, num_layers=2, d_ff=4)
    assert main(["--attributions", str(run), "--output", str(tmp_path / "n.json"), "--num_layers", "2",
                 "--d_ff", "4"]) == 2  # fmt: skip
    assert not (tmp_path / "n.json").exists()


def test_missing_attributions_and_out_of_range_neurons(tmp_path: Path) -> None:
    with pytest.raises(SelectionError, match="run `knlight predict"):
        run_selection(str(tmp_path / "nowhere"), None, num_layers=2, d_ff=4)
    run = predict_output(tmp_path / "attr", [_line("F1", "en", 0, [[5, 0, 1.0]])])
    with pytest.raises(SelectionError, match=r"neuron \[5, 0\] is outside the model \(2 layers × 4\)"):
        run_selection(str(run), None, num_layers=2, d_ff=4)


def test_command_line_writes_the_file(tmp_path: Path) -> None:
    run = predict_output(tmp_path / "attr", _lines(), _scores())
    out = tmp_path / "n.json"
    code = main([
        "--attributions", str(run), "--output", str(out), "--num_layers", "2", "--d_ff", "4",
        "--kn.adaptive", "false", "--likn.min_languages", "1", "--uncertainty.enabled", "true",
    ])  # fmt: skip
    assert code == 0
    neurons = read_neuron_file(out)
    assert neurons.method["likn"] == {"min_languages": 1} and neurons.facts["F1"].uncertainty
    assert set(neurons.facts["F1"].language_independent) == {(1, 2), (0, 3)}


# The selection command's DKN search on a model with a known degenerate pair (a planted one, which it must
# find) is tests/test_planted_loops.py::test_every_loop_runs_on_a_saved_plant.


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dai", "amig"])
def test_committed_tiny_neuron_files_are_reproduced(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The regeneration commands in configs/tiny/intervene.yaml reproduce the committed files byte for byte."""
    from knlight.cli import main as knlight_main

    repo = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(
        tmp_path
    )  # the neuron file records the attributions folder as given: runs/tiny-neurons/...
    extra = (
        ["--model.init_args.return_scores", "true", "--trainer.callbacks.init_args.save_scores", "true"]
        if name == "dai"
        else ["--model.init_args.ig.baseline", "amig"]
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as when the files were generated
    try:
        knlight_main([
            "predict", "--config", str(repo / "configs" / "tiny" / "localize.yaml"),
            "--data.init_args.path", str(repo / "tests" / "fixtures" / "rml_small.jsonl"),
            "--trainer.enable_progress_bar", "false", "--model.init_args.ig.steps", "4",
            "--trainer.callbacks.init_args.output_dir", f"runs/tiny-neurons/{name}", *extra,
        ])  # fmt: skip
        options = {"uncertainty": UncertaintyOptions(enabled=True)} if name == "dai" else {}
        run_selection(
            f"runs/tiny-neurons/{name}", str(tmp_path / f"{name}.json"), likn=LiknOptions(min_languages=2),
            dkn=DknOptions(enabled=True), known=KnownOptions(enabled=False), **options,
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    committed = repo / "configs" / "tiny" / "neurons" / f"{name}.json"
    assert (tmp_path / f"{name}.json").read_bytes() == committed.read_bytes()


def test_selection_top_k_caps_the_refined_neurons(tmp_path: Path) -> None:
    run = predict_output(tmp_path / "attr", _lines())
    kn = KnOptions(adaptive=False, top_k=1)
    result = run_selection(str(run), None, num_layers=2, d_ff=4, kn=kn)
    assert result.facts["F1"].languages == {"en": [(1, 2)], "de": [(0, 3)]}  # de: (0, 3) has the higher mean
