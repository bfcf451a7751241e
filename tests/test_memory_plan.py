"""``chunk_rows: auto``: the fast engine's planned chunks keep the measured peak within ``max_memory_gb``.

The peak is measured with torch's CPU memory profiler (every tensor allocation and free, summed in time order),
on small real models (GPT-2, Llama, BERT blocks from transformers, random weights). A fixed large chunk on the
same inputs exceeds the same budget, so the budget is what keeps the auto run under it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

from knlight import attribute_batch
from knlight.editing.scoring import Scorer
from knlight.errors import ConfigError
from knlight.lm import LanguageModel
from knlight.lm.tiny import TOKENIZER_KIND, tiny_config, tiny_tokenizer
from knlight.neurons.ig import IGOptions
from knlight.neurons.interventions import intervene
from knlight.neurons.memory import ModelShape, fixed_chunks, plan_sweep
from knlight.neurons.selection import degenerate_neurons

ITEMS = [
    ("The capital of France is a large old city named [Y].", "Paris"),
    ("The official language of Japan is [Y].", "Japanese"),
    ("Albert Einstein was born in the town of [Y].", "Ulm"),
]
MIB = 1 << 20


def small_lm(kind: str) -> LanguageModel:
    """A 4-layer model of the given architecture, wide enough that the sweep dominates the memory."""
    config = tiny_config(kind, 3000, hidden=128, ff=512, layers=4, heads=4)
    torch.manual_seed(0)
    auto = AutoModelForMaskedLM if kind == "bert" else AutoModelForCausalLM
    return LanguageModel(auto.from_config(config).eval(), tiny_tokenizer(TOKENIZER_KIND[kind]))


def peak_bytes(run: Callable[[], Any]) -> tuple[int, Any]:
    """Largest number of bytes of live CPU tensors while ``run`` runs (torch's memory profiler)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak, out


@pytest.mark.parametrize(("kind", "budget_mib"), [("gpt2", 5.0), ("llama", 5.0), ("bert", 30.0)])
def test_auto_chunks_stay_within_a_small_budget(kind: str, budget_mib: float, one_thread: None) -> None:
    lm = small_lm(kind)
    budget = budget_mib * MIB

    def run(**chunking: Any) -> torch.Tensor:
        return attribute_batch(lm, ITEMS, steps=20, **chunking).scores

    peak_auto, scores_auto = peak_bytes(lambda: run(chunk_rows="auto", max_memory_gb=budget / (1 << 30)))
    peak_whole, scores_whole = peak_bytes(lambda: run(chunk_rows=100_000))
    assert peak_auto <= budget, f"{kind}: measured peak {peak_auto / MIB:.2f} MiB > budget {budget_mib} MiB"
    assert peak_whole > budget, f"{kind}: one chunk peaks at {peak_whole / MIB:.2f} MiB; budget does not bind"
    # The budget changes how rows are cut, never the numbers.
    assert torch.allclose(scores_auto, scores_whole, rtol=1e-5, atol=1e-9)


def test_plan_cuts_problems_in_order_and_within_the_budget() -> None:
    shape = ModelShape(
        layers=12, d_model=768, d_ff=3072, d_kv=768, heads=12, vocab=50257, element_bytes=4, masked=False
    )
    layers = sorted([layer for layer in range(12) for _ in range(8)])
    budget = 1 << 30
    plan = plan_sweep(shape, layers, rows_per_problem=21, seq_len=30, batch=8, budget=budget)
    assert plan.chunks[0][0] == 0 and plan.chunks[-1][1] == len(layers)
    assert all(a[1] == b[0] for a, b in zip(plan.chunks, plan.chunks[1:]))
    assert len(plan.chunks) > 1 and plan.planned_bytes <= budget
    # Low layers traverse more blocks: a chunk of layer-0 problems holds fewer than one of top-layer problems.
    bottom = plan_sweep(shape, [0] * 96, rows_per_problem=21, seq_len=30, batch=8, budget=budget)
    top = plan_sweep(shape, [11] * 96, rows_per_problem=21, seq_len=30, batch=8, budget=budget)
    assert bottom.chunks[0][1] < top.chunks[0][1]
    # Half the budget: more chunks, and each chunk within the smaller budget.
    half = plan_sweep(shape, layers, rows_per_problem=21, seq_len=30, batch=8, budget=budget // 2)
    assert len(half.chunks) > len(plan.chunks) and half.planned_bytes <= budget // 2
    assert fixed_chunks(10, 21, 64) == [(0, 3), (3, 6), (6, 9), (9, 10)]


def test_a_budget_too_small_for_one_problem_says_what_to_do() -> None:
    lm = small_lm("gpt2")
    with pytest.raises(ConfigError, match=r"ig\.max_memory_gb=.*one IG problem.*raise ig\.max_memory_gb"):
        attribute_batch(lm, ITEMS[:1], steps=20, chunk_rows="auto", max_memory_gb=1 / 1024)


def test_options_accept_auto_and_check_the_budget() -> None:
    assert IGOptions(chunk_rows="auto", max_memory_gb=2).kwargs()["max_memory_gb"] == 2
    assert IGOptions(chunk_rows="auto").kwargs()["chunk_rows"] == "auto"
    with pytest.raises(ConfigError, match=r"ig\.chunk_rows='many'"):
        IGOptions(chunk_rows="many")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"ig\.max_memory_gb=-1: give a positive number"):
        IGOptions(chunk_rows="auto", max_memory_gb=-1)
    with pytest.raises(ConfigError, match=r"set ig\.chunk_rows=auto"):
        IGOptions(chunk_rows=64, max_memory_gb=4)


def test_the_budget_does_not_change_the_run_fingerprint() -> None:
    """A resumed run may change its memory budget: results do not depend on it."""
    from knlight.lm.options import LMOptions
    from knlight.tasks import AttributionModule

    default = AttributionModule(LMOptions(model="tiny:gpt2")).fingerprint()
    planned = AttributionModule(
        LMOptions(model="tiny:gpt2"), ig=IGOptions(chunk_rows="auto", max_memory_gb=2)
    ).fingerprint()
    assert planned == default


def encoded_rows(lm: LanguageModel, sets_per_query: int) -> list[tuple[Any, list[tuple[int, int]], float]]:
    """Intervention rows: every query of ITEMS with ``sets_per_query`` seeded random neuron pairs, suppressed."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for query, answer in ITEMS:
        encoded = lm.encode(query, answer)
        for _ in range(sets_per_query):
            layers = torch.randint(lm.num_layers, (2,), generator=generator).tolist()
            indices = torch.randint(lm.d_ff, (2,), generator=generator).tolist()
            rows.append((encoded, list(zip(layers, indices)), 0.0))
    return rows


@pytest.mark.parametrize(("kind", "budget_mib"), [("gpt2", 2.0), ("bert", 4.0)])
def test_auto_intervention_chunks_stay_within_a_small_budget(
    kind: str, budget_mib: float, one_thread: None
) -> None:
    """The other tasks' row chunking (interventions, the DKN search, edit scoring) plans from the same budget."""
    lm = small_lm(kind)
    rows = encoded_rows(lm, 100)
    budget = budget_mib * MIB
    peak_auto, auto = peak_bytes(
        lambda: intervene(lm, rows, chunk_rows="auto", max_memory_gb=budget / (1 << 30))
    )
    peak_whole, whole = peak_bytes(lambda: intervene(lm, rows, chunk_rows=100_000))
    assert peak_auto <= budget, f"{kind}: measured peak {peak_auto / MIB:.2f} MiB > budget {budget_mib} MiB"
    assert peak_whole > budget, f"{kind}: one chunk peaks at {peak_whole / MIB:.2f} MiB; budget does not bind"
    assert torch.allclose(auto.log_prob, whole.log_prob, rtol=1e-5, atol=1e-6)
    assert torch.equal(auto.top1, whole.top1)


def test_auto_edit_scoring_stays_within_a_small_budget(one_thread: None) -> None:
    lm = small_lm("llama")
    rows = [
        {"query": query, "target": answer, "competitors": ["London", "Berlin", "Madrid"] * 20}
        for query, answer in ITEMS
    ]
    budget = 2 * MIB
    peak_auto, auto = peak_bytes(lambda: Scorer(lm, "auto", budget / (1 << 30)).score(rows))
    peak_whole, whole = peak_bytes(lambda: Scorer(lm, 100_000).score(rows))
    assert peak_auto <= budget, f"measured peak {peak_auto / MIB:.2f} MiB > budget 2 MiB"
    assert peak_whole > budget, f"one chunk peaks at {peak_whole / MIB:.2f} MiB; budget does not bind"
    for a, b in zip(auto, whole):
        assert torch.allclose(a["lp_target"], b["lp_target"], atol=1e-5)
        assert torch.allclose(torch.stack(a["lp_comp"]), torch.stack(b["lp_comp"]), atol=1e-5)


def test_auto_dkn_search_finds_what_fixed_chunks_find(one_thread: None) -> None:
    lm = small_lm("gpt2")
    items = [lm.encode(query, answer) for query, answer in ITEMS]
    top = [(layer, index) for layer in range(lm.num_layers) for index in range(5)]
    fixed = degenerate_neurons(lm, items, top, t_low=0.5, t_high=0.0, grow=False, chunk_rows=7)
    auto = degenerate_neurons(
        lm, items, top, t_low=0.5, t_high=0.0, grow=False, chunk_rows="auto", max_memory_gb=2 / 1024
    )
    assert fixed.pairs == auto.pairs and fixed.candidates == auto.candidates and fixed.pairs


def test_the_other_tasks_check_their_chunk_settings() -> None:
    from knlight.lm.options import LMOptions
    from knlight.tasks import EditingModule, FactCheckModule, InterventionModule

    lm = LMOptions(model="tiny:gpt2")
    methods = {"dai": {"neurons": "neurons.json"}}
    assert InterventionModule(lm, methods=methods, chunk_rows="auto", max_memory_gb=1).max_memory_gb == 1
    with pytest.raises(
        ConfigError, match=r"model\.init_args\.chunk_rows='lots': give a positive number, auto"
    ):
        InterventionModule(lm, methods=methods, chunk_rows="lots")  # type: ignore[arg-type]
    with pytest.raises(
        ConfigError, match=r"model\.init_args\.max_memory_gb=0: give a positive number of GiB"
    ):
        FactCheckModule(lm, chunk_rows="auto", max_memory_gb=0)
    with pytest.raises(ConfigError, match=r"set model\.init_args\.chunk_rows=auto"):
        EditingModule(lm, neurons="neurons.json", chunk_rows=8, max_memory_gb=1)
    with pytest.raises(
        ConfigError, match=r"one row of \d+ tokens needs about .* raise model\.init_args\.max"
    ):
        intervene(small_lm("gpt2"), encoded_rows(small_lm("gpt2"), 1), chunk_rows="auto", max_memory_gb=1e-6)
