"""NeuronEdit on every tiny architecture: only chosen slices move, bitwise revert, files, errors, algebra."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from knlight import load_lm
from knlight.lm import LanguageModel
from knlight.lm.hooks import edit_activations
from knlight.lm.tiny import ARCHITECTURES, tiny_model_and_tokenizer
from knlight.neurons.edits import (
    NeuronEdit,
    NeuronEditError,
    direct_edit,
    model_layout,
    output_columns,
    scale_edit,
)

NEURONS = [(0, 3), (0, 17), (2, 5), (2, 40)]
QUERIES = [("The capital of France is [Y].", "Paris"), ("Die Hauptstadt von Japan ist [Y].", "Tokio")]


def batch(lm: LanguageModel) -> tuple[torch.Tensor, torch.Tensor, list]:
    encoded = [lm.encode(q, a) for q, a in QUERIES]
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), lm.pad_token_id)
    mask = torch.zeros_like(ids)
    for r, e in enumerate(encoded):
        ids[r, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[r, : len(e.input_ids)] = 1
    return ids, mask, encoded


def logits(lm: LanguageModel) -> torch.Tensor:
    ids, mask, _ = batch(lm)
    with torch.no_grad():
        return lm.model(input_ids=ids, attention_mask=mask).logits


def nll(lm: LanguageModel) -> torch.Tensor:
    ids, mask, encoded = batch(lm)
    log_probs = torch.log_softmax(lm.model(input_ids=ids, attention_mask=mask).logits, -1)
    return -sum(log_probs[r, p, t] for r, e in enumerate(encoded) for p, t in e.targets)


def neuron_mask(
    name: str, shape: torch.Size, lm: LanguageModel, neurons: list[tuple[int, int]]
) -> torch.Tensor:
    """Where an edit of ``neurons`` may change parameter ``name`` (True = inside a neuron's slice)."""
    mask = torch.zeros(shape, dtype=torch.bool)
    named = dict(lm.model.named_parameters())
    conv1d = lm.sites.spec.conv1d
    for layer, index in neurons:
        for proj in lm.sites.in_projs[layer]:
            if named[name] is proj.weight:
                mask[(slice(None), index) if conv1d else (index,)] = True
            if getattr(proj, "bias", None) is not None and named[name] is proj.bias:
                mask[index] = True
        if named[name] is lm.sites.out_projs[layer].weight:
            mask[(index,) if conv1d else (slice(None), index)] = True
    return mask


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


def test_training_moves_only_the_selected_slices_and_remove_restores_bitwise(arch: str) -> None:
    lm = load_lm(f"tiny:{arch}")
    original = {k: v.clone() for k, v in lm.model.state_dict().items()}
    clean = logits(lm)
    edit = NeuronEdit.for_model(lm, NEURONS).apply(lm)
    assert [p.shape for p in edit.parameters()] == [
        (len(lm.sites.in_projs[0]), 4, model_layout(lm).d_model),
        *([(len(lm.sites.in_projs[0]), 4)] if model_layout(lm).in_bias else []),
        (4, model_layout(lm).d_model),
    ]
    optimizer = torch.optim.Adam(edit.parameters(), lr=0.05)
    for _ in range(3):
        optimizer.zero_grad()
        nll(lm).backward()
        optimizer.step()
    assert all(torch.equal(v, original[k]) for k, v in lm.model.state_dict().items())  # base never written
    assert all(p.grad is None for p in lm.model.parameters())
    edited = logits(lm)
    assert not torch.allclose(edited, clean)

    merged = edit.merged_weights(lm)
    changed_somewhere = False
    for name, weight in lm.model.named_parameters():
        allowed = neuron_mask(name, weight.shape, lm, NEURONS)
        differs = merged[name] != weight
        assert not (differs & ~allowed).any(), f"{arch}: {name} changed outside the neurons' slices"
        changed_somewhere |= bool(differs.any())
    assert changed_somewhere
    # Every kind of slice moved: input rows of each projection (+ bias) and output columns.
    assert edit.in_weight.abs().amin(dim=-1).gt(0).all() and edit.out_weight.abs().amin(dim=-1).gt(0).all()

    edit.remove()
    assert torch.equal(logits(lm), clean)
    with edit.applied(lm), edit.disabled():
        assert torch.equal(logits(lm), clean)

    edit.merge(lm)
    assert not edit.attached
    torch.testing.assert_close(logits(lm), edited, rtol=1e-4, atol=1e-5)
    for name, weight in lm.model.named_parameters():
        assert torch.equal(weight, merged[name])
    edit.unmerge()
    assert all(torch.equal(v, original[k]) for k, v in lm.model.state_dict().items())
    assert torch.equal(logits(lm), clean)


def test_save_load_round_trip_onto_a_fresh_model(arch: str, tmp_path: Path) -> None:
    lm = load_lm(f"tiny:{arch}")
    edit = NeuronEdit.for_model(lm, NEURONS, {"model": f"tiny:{arch}"})
    torch.manual_seed(1)
    with torch.no_grad():
        for p in edit.parameters():
            p.normal_(0, 0.3)
    with edit.applied(lm):
        expected = logits(lm)
    path = edit.save(tmp_path / "edit.safetensors", method="test", facts=["P36:a:b"])
    assert path.stat().st_size < 20_000

    fresh = load_lm(f"tiny:{arch}")
    loaded = NeuronEdit.load(path, fresh)
    assert loaded.neurons == edit.neurons
    assert loaded.metadata["model"] == f"tiny:{arch}" and loaded.metadata["facts"] == ["P36:a:b"]
    assert loaded.metadata["method"] == "test" and loaded.metadata["date"]
    with loaded.applied(fresh):
        assert torch.equal(logits(fresh), expected)


def test_out_of_range_neurons_and_other_models_are_refused(tmp_path: Path) -> None:
    lm = load_lm("tiny:gpt2")  # 3 layers × 64 neurons
    with pytest.raises(
        NeuronEditError, match=r"neuron \(layer=3, index=0\) is outside this model \(3 layers"
    ):
        NeuronEdit.for_model(lm, [(3, 0)])
    with pytest.raises(NeuronEditError, match=r"index=64\) is outside"):
        NeuronEdit.for_model(lm, [(0, 64)])
    with pytest.raises(NeuronEditError, match="empty"):
        NeuronEdit.for_model(lm, [])
    path = NeuronEdit.for_model(lm, [(1, 50)]).save(tmp_path / "e.safetensors")
    narrow, tokenizer = tiny_model_and_tokenizer("gpt2", ff=32)
    with pytest.raises(NeuronEditError, match=r"index=50\) is outside this model \(3 layers × 32"):
        NeuronEdit.load(path, LanguageModel(narrow, tokenizer))
    small_ok = NeuronEdit.for_model(lm, [(1, 5)]).save(tmp_path / "ok.safetensors")
    with pytest.raises(NeuronEditError, match="d_ff: edit 64 vs model 32"):
        NeuronEdit.load(small_ok, LanguageModel(narrow, tokenizer))
    with pytest.raises(NeuronEditError, match="no such edit file"):
        NeuronEdit.load(tmp_path / "missing.safetensors")
    edit = NeuronEdit.for_model(lm, [(1, 5)]).apply(lm)
    with pytest.raises(NeuronEditError, match="attached already"):
        edit.apply(lm)


def test_output_column_delta_changes_the_ffn_output_by_delta_times_h(arch: str) -> None:
    lm = load_lm(f"tiny:{arch}")
    layer, n = 2, 5
    out_proj = lm.sites.out_projs[layer]
    seen: dict[str, torch.Tensor] = {}
    handle = out_proj.register_forward_hook(lambda m, a, o: seen.update(h=a[0].detach(), out=o.detach()))
    try:
        logits(lm)
        h = seen["h"]
        base = out_proj(h)
        edit = NeuronEdit.for_model(lm, [(layer, n)])
        delta = torch.randn(model_layout(lm).d_model, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            edit.out_weight[0] = delta
        with edit.applied(lm):
            edited = out_proj(h)
    finally:
        handle.remove()
    torch.testing.assert_close(edited - base, h[..., n : n + 1] * delta, rtol=1e-5, atol=1e-6)


def test_input_row_delta_equals_the_weight_delta() -> None:
    lm = load_lm("tiny:llama")  # gated: the delta goes into gate and up rows
    edit = NeuronEdit.for_model(lm, [(1, 9)])
    with torch.no_grad():
        edit.in_weight.normal_(0, 0.5)
    gate, up = lm.sites.in_projs[1]
    x = torch.randn(2, 3, model_layout(lm).d_model)
    with edit.applied(lm):
        hooked = gate(x), up(x)
    for proj, out, j in zip((gate, up), hooked, range(2)):
        weight = proj.weight.detach().clone()
        weight[9] += edit.in_weight[j, 0].detach()
        torch.testing.assert_close(out, x @ weight.T, rtol=1e-5, atol=1e-6)


def test_scale_edit_equals_scaling_the_activation_everywhere(arch: str) -> None:
    lm = load_lm(f"tiny:{arch}")
    for factor in (0.0, 2.0):
        with scale_edit(lm, NEURONS[:2], factor).applied(lm):
            by_weight = logits(lm)

        def scale(h: torch.Tensor, factor: float = factor) -> torch.Tensor:
            h = h.clone()
            h[..., [3, 17]] *= factor
            return h

        with edit_activations(lm.sites.out_projs[0], scale):
            by_activation = logits(lm)
        torch.testing.assert_close(by_weight, by_activation, rtol=1e-4, atol=1e-5)


def test_direct_edit_is_dai_update_of_output_columns() -> None:
    lm = load_lm("tiny:bert")
    neurons = [(2, 1), (2, 4)]
    edit = direct_edit(lm, [(neurons, 10, 20), ([(2, 4)], 30, 40)], lambda_old=1.0, lambda_new=8.0)
    table = lm.model.get_output_embeddings().weight.detach()
    torch.testing.assert_close(edit.out_weight[0], 8 * table[10] - table[20])
    torch.testing.assert_close(edit.out_weight[1], 8 * table[10] - table[20] + 8 * table[30] - table[40])
    assert edit.in_weight.abs().sum() == 0
    assert edit.metadata["method"] == "direct"
    assert output_columns(lm, neurons).shape == (2, model_layout(lm).d_model)


def test_module_apply_with_a_function_still_works() -> None:
    lm = load_lm("tiny:gpt2")
    edit = NeuronEdit.for_model(lm, [(1, 5)])
    seen: list[str] = []
    torch.nn.Sequential(edit).apply(lambda m: seen.append(type(m).__name__))  # as parents call it
    assert seen == ["NeuronEdit", "Sequential"] and not edit.attached


# ----------------------------------------------------------------------------------------------------------
# which model an edit was made on; unreadable files; atomic saves


def test_base_identity_tells_the_same_weights_from_other_ones(arch: str) -> None:
    lm = load_lm(f"tiny:{arch}")
    edit = NeuronEdit.for_model(lm, NEURONS, {"model": f"tiny:{arch}"})
    made_on = edit.metadata["base_model"]
    assert made_on["name"] == f"tiny:{arch}" and len(made_on["sketch"]) == 8 and made_on["norm"] > 0
    assert edit.base_identity(load_lm(f"tiny:{arch}"), f"tiny:{arch}") == made_on  # deterministic
    edit.check_base(load_lm(f"tiny:{arch}", dtype="bf16"))  # the same weights in another dtype pass
    with pytest.raises(NeuronEditError, match="other base weights at the edited neurons"):
        edit.check_base(load_lm(f"tiny:{arch}:1"))


def test_an_edit_made_on_another_model_of_the_same_shape_is_refused(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    other = load_lm("tiny:gpt2:7")
    path = NeuronEdit.for_model(other, NEURONS, {"model": "tiny:gpt2:7"}).save(tmp_path / "edit.safetensors")
    lm = load_lm("tiny:gpt2")  # same shape, other weights
    with pytest.raises(NeuronEditError) as error:
        NeuronEdit.load(path, lm, model_name="tiny:gpt2")
    message = str(error.value)
    assert str(path) in message and "'tiny:gpt2:7'" in message and "'tiny:gpt2')" in message
    assert "allow_other_model" in message and "model.init_args.allow_other_model: true" in message
    with caplog.at_level("WARNING", logger="knlight.neurons.edits"):
        forced = NeuronEdit.load(path, lm, model_name="tiny:gpt2", allow_other_model=True)
    assert forced.neurons == sorted(NEURONS) and "applying it anyway" in caplog.text
    NeuronEdit.load(path, load_lm("tiny:gpt2:7"), model_name="renamed copy")  # same weights, other name: fine

    from knlight.data.records import read_records
    from knlight.lm.options import LMOptions
    from knlight.tasks.editing import EditingModule

    module = EditingModule(LMOptions("tiny:gpt2"), neuron_rule="ffn", layers=[2], load_edit=str(path))
    module.use_records(read_records(str(Path(__file__).parent / "fixtures" / "rml_small.jsonl")))
    with pytest.raises(
        NeuronEditError, match="made on model 'tiny:gpt2:7', but this model \\('tiny:gpt2'\\)"
    ):
        module.configure_model()

    legacy = NeuronEdit.for_model(lm, NEURONS)
    del legacy.metadata["base_model"]  # as files written before edits recorded their model
    caplog.clear()
    with caplog.at_level("WARNING", logger="knlight.neurons.edits"):
        NeuronEdit.load(legacy.save(tmp_path / "legacy.safetensors"), other)
    assert "does not record the model it was made on" in caplog.text


def test_truncated_or_corrupt_edit_files_get_an_error_naming_the_file(tmp_path: Path) -> None:
    lm = load_lm("tiny:gpt2")
    whole = NeuronEdit.for_model(lm, NEURONS).save(tmp_path / "edit.safetensors").read_bytes()
    damaged = {"truncated": whole[: len(whole) // 2], "header only": whole[:100], "empty": b"",
               "not safetensors": b"PK\x03\x04 a zip, not an edit"}  # fmt: skip
    for kind, content in damaged.items():
        path = tmp_path / f"{kind}.safetensors"
        path.write_bytes(content)
        with pytest.raises(NeuronEditError, match="truncated or corrupt") as error:
            NeuronEdit.load(path, lm)
        assert str(path) in str(error.value) and "re-create it with `knlight fit`" in str(error.value), kind


def test_save_is_atomic_with_normal_permissions(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    lm = load_lm("tiny:gpt2")
    umask = os.umask(0o022)
    try:
        path = NeuronEdit.for_model(lm, NEURONS).save(tmp_path / "edit.safetensors")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o644
    before = path.read_bytes()
    # A full disk, for real: the file size limit of a child process (writes past it fail with EFBIG).
    script = (
        "import resource, signal, sys\n"
        "from knlight import load_lm\n"
        "from knlight.neurons.edits import NeuronEdit\n"
        "edit = NeuronEdit.for_model(load_lm('tiny:gpt2'), [(l, i) for l in range(3) for i in range(64)])\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (len(open(sys.argv[1], 'rb').read()),) * 2)\n"
        "try:\n"
        "    edit.save(sys.argv[1])\n"
        "except OSError as error:\n"
        "    sys.exit(0 if 'File too large' in str(error) and sys.argv[1] in str(error) else 1)\n"
        "sys.exit(2)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert path.read_bytes() == before  # the previous edit is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edit.safetensors"]  # no temporary file left


def test_the_identity_sketch_indexes_large_edits_in_range() -> None:
    """A whole-FFN edit of SmolLM2-135M has 79,626,240 base values; float32 indices rounded past the end."""
    from knlight.neurons.edit_files import evenly_spaced

    for n in (79_626_240, 2**24 + 1, 65_537, 7):
        index = evenly_spaced(n, min(n, 65_536))
        assert int(index[0]) == 0 and int(index[-1]) == n - 1
        assert bool((index[1:] > index[:-1]).all())
    assert int(torch.linspace(0, 79_626_239, 65_536).round().long()[-1]) == 79_626_240  # the float32 bug
