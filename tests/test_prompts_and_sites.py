"""Targets (slot, special tokens, teacher forcing), neuron sites per architecture and bad-input errors."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import AutoModelForCausalLM, MambaConfig

from knlight import attribute, load_lm
from knlight.lm.hooks import capture_activations
from knlight.lm.prompts import QueryError
from knlight.lm.sites import UnsupportedModelError
from knlight.lm.tiny import ARCHITECTURES


@functools.cache
def tiny(arch: str):
    return load_lm(f"tiny:{arch}")


def test_causal_prompt_is_text_before_slot_and_gold_prefix_is_teacher_forced() -> None:
    lm = tiny("llama")  # its tokenizer prepends BOS
    tok = lm.tokenizer
    enc = lm.encode("Marie Curie was a [Y] of note.", "physicist and chemist")
    full = tok("Marie Curie was a physicist and chemist")["input_ids"]
    prompt = tok("Marie Curie was a")["input_ids"]
    assert full[0] == tok.bos_token_id and enc.input_ids[0] == tok.bos_token_id  # BOS stays in the prompt
    answer = full[len(prompt) :]
    assert len(answer) > 1
    # Input = prompt + all answer tokens but the last (gold prefix, not the model's argmax); tail dropped.
    assert list(enc.input_ids) == full[:-1]
    assert [t for _, t in enc.targets] == answer
    assert [p for p, _ in enc.targets] == list(range(len(prompt) - 1, len(full) - 1))
    assert all(t != tok.bos_token_id for _, t in enc.targets)


def test_masked_fills_one_mask_per_answer_token_and_never_targets_specials() -> None:
    lm = tiny("bert")
    tok = lm.tokenizer
    enc = lm.encode("[Y] is the capital of France.", "Paris")
    ids = list(enc.input_ids)
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert [ids[p] for p, _ in enc.targets] == [tok.mask_token_id] * len(enc.targets)
    assert all(p not in (0, len(ids) - 1) for p, _ in enc.targets)
    multi = lm.encode("Marie Curie was a [Y].", "physicist and chemist")
    assert len(multi.targets) == len(tok("physicist and chemist", add_special_tokens=False)["input_ids"])
    assert all(
        p not in {q for w in multi.words for q in w} for p, _ in multi.targets
    )  # answer is no AMIG word


def test_bpe_leading_space_is_part_of_the_answer_token() -> None:
    lm = tiny("gpt2")
    enc = lm.encode("The capital of France is [Y].", "Paris")
    ((pos, token),) = enc.targets
    assert lm.tokenizer.convert_ids_to_tokens([token]) == ["ĠParis"]
    assert pos == len(enc.input_ids) - 1


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_sites_are_inputs_of_the_ffn_output_projection(arch: str) -> None:
    lm = tiny(arch)
    assert lm.num_layers == 3
    store: dict[int, torch.Tensor] = {}
    pre: dict[int, torch.Tensor] = {}
    in_projs = lm.sites.in_projs[0]
    hooks = [
        m.register_forward_hook(lambda mod, a, out, k=k: pre.__setitem__(k, out))
        for k, m in enumerate(in_projs)
    ]
    ids = torch.tensor([lm.encode("The capital of France is [Y].", "Paris").input_ids])
    with torch.no_grad(), capture_activations(lm.sites.out_projs, store):
        lm.model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    assert sorted(store) == [0, 1, 2]
    h = store[0]
    assert h.shape[-1] == lm.d_ff
    if arch in ("llama", "gemma3_text", "qwen2"):
        # Gated MLP: h = act(gate) * up, not the gate (the reference code's pre-activation site).
        act = lm.sites.blocks[0].mlp.act_fn
        assert torch.allclose(h, act(pre[0]) * pre[1], atol=1e-6)
        assert not torch.allclose(h, pre[0], atol=1e-3)
    else:
        # GELU output is >= -0.17; the pre-activation W_in·x goes far below, so h is post-activation.
        assert pre[0].min() < -0.5 and h.min() > -0.2


def test_bad_queries_raise_clear_errors() -> None:
    lm = tiny("gpt2")
    with pytest.raises(QueryError, match=r"exactly once \(found 0\)"):
        lm.encode("The capital of France is Paris.", "Paris")
    with pytest.raises(QueryError, match=r"found 2"):
        lm.encode("[Y] and [Y]", "Paris")
    with pytest.raises(QueryError, match="empty"):
        lm.encode("The capital of France is [Y].", "  ")
    with pytest.raises(QueryError, match="nothing before the slot"):
        lm.encode("[Y] is the capital of France.", "Paris")
    with pytest.raises(ValueError, match=r"layers \[7\] out of range"):
        attribute(lm, "The capital of France is [Y].", "Paris", layers=[7])
    with pytest.raises(ValueError, match="unknown quadrature 'simpson'"):
        attribute(lm, "The capital of France is [Y].", "Paris", quadrature="simpson")
    with pytest.raises(ValueError, match="unknown baseline"):
        attribute(lm, "The capital of France is [Y].", "Paris", baseline="uniform")


def test_unsupported_architecture_names_the_registry() -> None:
    model = AutoModelForCausalLM.from_config(MambaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1))
    with pytest.raises(UnsupportedModelError, match=r"knlight\.lm\.sites\.REGISTRY"):
        load_lm(model, tiny("gpt2").tokenizer)


def test_tiny_tokenizers_are_identical_in_another_process() -> None:
    # DDP ranks and benchmark workers each build their own tiny tokenizer: it must be the same one.
    import hashlib
    import subprocess
    import sys

    from knlight.lm.tiny import tiny_tokenizer

    code = (
        "import hashlib\nfrom knlight.lm.tiny import tiny_tokenizer\n"
        "for k in ('wordpiece', 'unigram', 'bpe'):\n"
        "    print(hashlib.sha256(tiny_tokenizer(k).backend_tokenizer.to_str().encode()).hexdigest())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    mine = [
        hashlib.sha256(tiny_tokenizer(k).backend_tokenizer.to_str().encode()).hexdigest()
        for k in ("wordpiece", "unigram", "bpe")
    ]
    assert out == mine


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_target_log_probs_equal_the_full_models_logits_at_the_targets(arch: str) -> None:
    """The head runs at the target positions only; the oracle is the model's own logits at every position."""
    lm = tiny(arch)
    encoded = [lm.encode("The capital of France is [Y].", "Paris"), lm.encode("Rome is in [Y].", "Italy")]
    got = lm.target_log_probs(encoded)
    ids, mask = lm.pad([e.input_ids for e in encoded])
    with torch.no_grad():
        logits = lm.model(input_ids=ids, attention_mask=mask).logits
    for row, (query, log_probs) in enumerate(zip(encoded, got, strict=True)):
        positions = [p for p, _ in query.targets]
        expected = torch.log_softmax(logits[row, positions].float(), dim=-1)
        assert log_probs.shape == expected.shape
        torch.testing.assert_close(log_probs, expected, atol=1e-5, rtol=1e-5)
