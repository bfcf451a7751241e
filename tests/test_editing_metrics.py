"""Editing metrics checked against numbers computed by hand (hand-made scores, and plain forwards).

* enhancement: ``fixed`` = share of queries wrong before that are right after, ``broken`` = right before and
  wrong after (the old code had them inverted);
* a no-op edit: locality top-1 = 1, KL = 0, every measure equal to the unedited model's; KL >= 0 always;
* reliability / generality / ``p_new`` / ``p_old`` and the training-free baseline rows (``direct``,
  ``suppress``, ``enhance``) against hand computations;
* the optimizer of an ``EditingModule`` holds the edit's deltas and nothing else.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from knlight import load_lm
from knlight.cli import main
from knlight.data.records import read_records
from knlight.neurons.edits import scale_edit

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "rml_small.jsonl"
CONFIG = REPO / "configs" / "tiny" / "edit.yaml"
UUIDS = ["P36:Q118903:Q216", "P36:Q23169:Q34217", "P37:Q485207:Q7850", "P37:Q505064:Q1412"]
FIRING = [[1, 40], [1, 54], [2, 42], [2, 10], [2, 57], [2, 2]]


def write_neurons(path: Path) -> Path:
    facts = {uuid: {"relation": uuid.split(":")[0], "language_independent": FIRING,
                    "languages": {"en": FIRING, "de": FIRING[:1]}} for uuid in UUIDS}  # fmt: skip
    data = {"format": "knlight-neurons/1", "model": "tiny:gpt2", "num_layers": 3, "d_ff": 64, "method": {}}
    path.write_text(json.dumps({**data, "facts": facts}), encoding="utf-8")
    return path


def run(
    root: Path, neurons: Path, command: str, *extra: str
) -> dict[tuple[str, str, str, str], tuple[float, int]]:
    main([command, "--config", str(CONFIG), "--trainer.logger.init_args.save_dir", str(root),
          "--trainer.enable_progress_bar", "false", "--data.init_args.path", str(FIXTURE),
          "--model.init_args.neurons", str(neurons), "--model.init_args.neuron_rule", "language_independent",
          "--model.init_args.layers", "null", *extra])  # fmt: skip
    (version,) = (root / "tiny-edit").glob("version_*")
    rows = json.loads((version / "editing_val.json").read_text(encoding="utf-8"))["rows"]
    return {(r["method"], r["role"], r["measure"], r["language"]): (r["value"], r["count"]) for r in rows}


def answer_log_prob(lm, query: str, answer: str) -> float:
    encoded = lm.encode(query, answer)
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([encoded.input_ids])).logits[0].float()
    positions = [p for p, _ in encoded.targets]
    tokens = torch.tensor([t for _, t in encoded.targets])
    return float(torch.log_softmax(logits[positions], -1).gather(1, tokens[:, None]).sum())


def test_enhancement_fixed_and_broken_count_what_they_say(tmp_path: Path) -> None:
    neurons = write_neurons(tmp_path / "neurons.json")
    factor = 2.5
    values = run(tmp_path / "runs", neurons, "validate", "--model.init_args.mode", "enhance",
                 "--model.init_args.enhance_factor", str(factor), "--model.init_args.baselines", "[]")  # fmt: skip
    lm = load_lm("tiny:gpt2")
    union = sorted({tuple(n) for n in FIRING})
    edit = scale_edit(lm, union, factor)
    right_before, right_after = [], []
    for record in read_records(str(FIXTURE)):
        for query in record.queries:
            if query.lstrip().startswith("[Y]"):
                continue  # a causal model cannot use these (the data module drops them)
            for on, out in ((False, right_before), (True, right_after)):
                if on:
                    edit.apply(lm)
                try:
                    true = answer_log_prob(lm, query, record.object)
                    wrong = max(answer_log_prob(lm, query, w) for w in record.wrong_objects)
                finally:
                    edit.remove()
                out.append(true > wrong)
    wrong_idx = [k for k, r in enumerate(right_before) if not r]
    right_idx = [k for k, r in enumerate(right_before) if r]
    assert wrong_idx and right_idx
    fixed = sum(right_after[k] for k in wrong_idx) / len(wrong_idx)
    broken = sum(not right_after[k] for k in right_idx) / len(right_idx)
    assert values[("enhanced", "facts", "fixed", "all")] == (pytest.approx(fixed), len(wrong_idx))
    assert values[("enhanced", "facts", "broken", "all")] == (pytest.approx(broken), len(right_idx))
    assert values[("unedited", "facts", "rank", "all")][0] == pytest.approx(
        len(right_idx) / len(right_before)
    )
    assert values[("enhanced", "facts", "rank", "all")][0] == pytest.approx(
        sum(right_after) / len(right_after)
    )
    assert 0 < fixed < 1 or 0 < broken < 1  # the case is not degenerate: some queries change


def score(target: float, competitors: list[float], first: list[float], first_token: int = 0):
    from knlight.editing import RowScore

    return RowScore(lp_target=torch.tensor(target), lp_comp=[torch.tensor(c) for c in competitors],
                    first=torch.log_softmax(torch.tensor(first), -1), first_token=first_token)  # fmt: skip


def measures(method: str, role: str, s, base) -> dict[tuple[str, str], float]:
    from knlight.editing import row_measures

    return {(r, m): float(v) for r, m, v in row_measures(method, role, s, base)}


def test_fixed_and_broken_on_hand_made_scores() -> None:
    wrong, right = score(-3.0, [-1.0, -2.0], [0.0, 1.0]), score(-0.5, [-1.0, -2.0], [1.0, 0.0])
    assert measures("enhanced", "facts", right, wrong) == {("facts", "top1"): 1.0, ("facts", "rank"): 1.0,
                                                          ("facts", "fixed"): 1.0}  # fmt: skip
    assert measures("enhanced", "facts", wrong, wrong)[("facts", "fixed")] == 0.0  # still wrong: not fixed
    assert measures("enhanced", "facts", wrong, right)[("facts", "broken")] == 1.0
    assert measures("enhanced", "facts", right, right)[("facts", "broken")] == 0.0  # still right: not broken
    assert set(measures("unedited", "facts", right, right)) == {("facts", "top1"), ("facts", "rank")}


def test_reliability_generality_p_new_p_old_by_hand() -> None:
    import math

    s = score(math.log(0.4), [math.log(0.1)], [2.0, 0.0, 1.0], first_token=0)
    base = score(math.log(0.05), [math.log(0.6)], [0.0, 3.0, 1.0])
    got = measures("edited", "reliability", s, base)
    assert got == pytest.approx({("reliability", "top1"): 1.0, ("reliability", "rank"): 1.0,
                                 ("reliability", "p_new"): 0.4, ("reliability", "p_old"): 0.1})  # fmt: skip
    cross = measures("edited", "generality_cross", base, base)
    assert cross == pytest.approx({(r, m): v for r in ("generality_cross", "generality") for m, v in
                                   (("top1", 0.0), ("rank", 0.0), ("p_new", 0.05), ("p_old", 0.6))})  # fmt: skip


def test_locality_of_a_no_op_is_perfect_and_kl_is_never_negative() -> None:
    base = score(-1.0, [], [0.3, -1.2, 2.0])
    assert measures("edited", "locality", base, base) == {("locality", "top1"): 1.0, ("locality", "kl"): 0.0}
    assert measures("unedited", "locality", base, base) == {}
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        p, q = (score(0.0, [], torch.randn(50, generator=generator).mul(3).tolist()) for _ in range(2))
        assert measures("edited", "locality", p, q)[("locality", "kl")] >= 0.0
    moved = score(-1.0, [], [0.3, 2.5, 2.0])
    assert measures("edited", "locality", moved, base)[("locality", "top1")] == 0.0


def _hand_scaled(
    lm,
    neurons: list[tuple[int, int]],
    column: dict[tuple[int, int], torch.Tensor] | None = None,
    factor: float = 1.0,
):
    """A copy of tiny GPT-2 whose W_out columns are changed by hand (Conv1D: a neuron's column is a row)."""
    import copy

    model = copy.deepcopy(lm.model)
    with torch.no_grad():
        for layer, index in neurons:
            weight = model.transformer.h[layer].mlp.c_proj.weight  # [d_ff, d]
            weight[index] *= factor
            if column is not None:
                weight[index] += column[(layer, index)]
    from knlight.lm import LanguageModel

    return LanguageModel(model, lm.tokenizer)


def test_no_op_edit_and_the_training_free_baselines_by_hand(tmp_path: Path) -> None:
    neurons = write_neurons(tmp_path / "neurons.json")
    values = run(
        tmp_path / "runs", neurons, "validate", "--model.init_args.baselines", "[direct, suppress, enhance]"
    )
    (version,) = (tmp_path / "runs" / "tiny-edit").glob("version_*")
    requests = json.loads((version / "editing_val.json").read_text(encoding="utf-8"))["requests"]
    assert len(requests) == 2
    # A fresh edit (zero deltas, nothing trained): identical to the unedited model everywhere.
    assert values[("edited", "locality", "top1", "all")][0] == 1.0
    assert values[("edited", "locality", "kl", "all")][0] == 0.0
    for key, (value, count) in values.items():
        if key[0] == "edited" and key[1] != "locality":
            assert (value, count) == values[("unedited", *key[1:])], key

    lm = load_lm("tiny:gpt2")
    records = {(r.uuid, r.language): r for r in read_records(str(FIXTURE))}
    union = sorted({tuple(n) for n in FIRING})
    rows = []  # (query, new object): the reliability rows, the first usable English query of each request
    for request in requests:
        record = records[(request["uuid"], "en")]
        query = next(q for q in record.queries if not q.lstrip().startswith("[Y]"))
        rows.append((query, request["new"]["en"], request["old"]["en"]))
    wte = lm.model.transformer.wte.weight.detach()
    direct = {n: torch.zeros(wte.shape[1]) for n in union}
    for query, new, old in rows:
        new_token = lm.encode(query, new).targets[0][1]
        old_token = lm.encode(query, old).targets[0][1]
        for n in union:  # Dai et al.: W_out[:, n] += λ2·E(new) − λ1·E(old), with λ1 = 1, λ2 = 8
            direct[n] += 8.0 * wte[new_token] - 1.0 * wte[old_token]
    by_hand = {"suppress": _hand_scaled(lm, union, factor=0.0), "enhance": _hand_scaled(lm, union, factor=2.0),
               "direct": _hand_scaled(lm, union, column=direct)}  # fmt: skip
    for method, model in by_hand.items():
        p_new = sum(torch.tensor(answer_log_prob(model, q, new)).exp() for q, new, _ in rows) / len(rows)
        p_old = sum(torch.tensor(answer_log_prob(model, q, old)).exp() for q, _, old in rows) / len(rows)
        assert values[(method, "reliability", "p_new", "all")][0] == pytest.approx(float(p_new), rel=1e-4)
        assert values[(method, "reliability", "p_old", "all")][0] == pytest.approx(float(p_old), rel=1e-4)
    unedited = values[("unedited", "reliability", "p_new", "all")][0]
    assert values[("direct", "reliability", "p_new", "all")][0] > unedited  # the direct edit moves P(new)


def test_the_optimizer_only_sees_the_deltas() -> None:
    from knlight.editing.options import EditTraining
    from knlight.lm.options import LMOptions
    from knlight.tasks.editing import EditingModule

    module = EditingModule(LMOptions("tiny:gpt2"), neurons=None, neuron_rule="ffn", layers=[1],
                           training=EditTraining(in_lr_scale=0.25),
                           optimizer=lambda params: torch.optim.SGD(params, lr=0.5))  # fmt: skip
    module.use_records(read_records(str(FIXTURE)))
    module.configure_model()
    optimizer = module.configure_optimizers()
    assert module.edit is not None
    seen = [p for group in optimizer.param_groups for p in group["params"]]
    deltas = [module.edit.out_weight, module.edit.in_weight, module.edit.in_bias]
    assert sorted(map(id, seen)) == sorted(map(id, deltas))
    assert not {id(p) for p in module.lm.model.parameters()} & set(map(id, seen))
    assert all(not p.requires_grad for p in module.lm.model.parameters())
    out_group, in_group = optimizer.param_groups
    assert out_group["params"] == [module.edit.out_weight] and in_group["lr"] == pytest.approx(0.5 * 0.25)
    assert module.edit.out_weight.shape[0] == lm_d_ff() and len(module.edit.neurons) == lm_d_ff()


def lm_d_ff() -> int:
    return load_lm("tiny:gpt2").d_ff
