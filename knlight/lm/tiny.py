"""Tiny random-weight models with real tokenizers, built offline (for tests, the tiny configs and benchmarks).

``load_lm("tiny:gpt2")`` (or ``tiny_lm("gpt2")``) builds a few-layer model of a supported architecture through
the real transformers classes, with a tokenizer trained on a small built-in multilingual corpus. Deterministic
for a given seed; nothing is downloaded.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    BertConfig,
    BloomConfig,
    Gemma3TextConfig,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    XLMRobertaConfig,
)

CORPUS = [
    "The capital of France is Paris.",
    "The capital of Germany is Berlin.",
    "The capital of Japan is Tokyo.",
    "The capital of Italy is Rome.",
    "The capital of Spain is Madrid.",
    "The capital of Russia is Moscow.",
    "The official language of France is French.",
    "The official language of Japan is Japanese.",
    "Paris is the capital of France.",
    "Berlin is located in Germany.",
    "Tokyo is a city in Asia.",
    "Die Hauptstadt von Frankreich ist Paris.",
    "Die Hauptstadt von Deutschland ist Berlin.",
    "Die Hauptstadt von Japan ist Tokio.",
    "Die Amtssprache von Frankreich ist Französisch.",
    "Столица Франции — Париж.",
    "Столица Германии — Берлин.",
    "Столица Японии — Токио.",
    "フランスの首都はパリです。",
    "ドイツの首都はベルリンです。",
    "日本の首都は東京です。",
    "La capitale de la France est Paris.",
    "La capital de España es Madrid.",
    "Albert Einstein was born in Ulm.",
    "Marie Curie was a physicist.",
    "Mount Everest is in Asia.",
]

ARCHITECTURES = ("bert", "xlm-roberta", "gpt2", "llama", "gemma3_text", "qwen2", "bloom")


def _corpus(extra: int = 200) -> list[str]:
    words = " ".join(CORPUS).split()
    generated = [" ".join(words[(7 * i) % len(words) : (7 * i) % len(words) + 6]) for i in range(extra)]
    return CORPUS + generated


def _word_counts(normalizer: Any, pre_tokenizer: Any) -> list[tuple[str, int]]:
    """Corpus words as the tokenizer's own normaliser and pre-tokeniser split them, most frequent first."""
    counts: dict[str, int] = {}
    for line in _corpus():
        text = normalizer.normalize_str(line) if normalizer is not None else line
        for word, _ in pre_tokenizer.pre_tokenize_str(text):
            counts[word] = counts.get(word, 0) + 1
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


# The `tokenizers` WordPiece and Unigram trainers are not deterministic across processes (hash order, EM
# rounding), and DDP ranks / benchmark workers each build their own tokenizer: so those two vocabularies are
# built deterministically from corpus word counts instead (whole words, then characters as fallback pieces).


@functools.cache
def tiny_tokenizer(kind: str, vocab_size: int = 600) -> PreTrainedTokenizerFast:
    """A real fast tokenizer trained on the built-in corpus.

    Args:
        kind: ``"wordpiece"`` (BERT), ``"unigram"`` (XLM-R style sentencepiece), ``"bpe"`` (GPT-2 byte-level)
            or ``"bpe_bos"`` (byte-level BPE that prepends BOS, as Llama/Gemma do).
        vocab_size: Target vocabulary size.
    """
    if kind == "wordpiece":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        normalizer = normalizers.BertNormalizer(lowercase=False)
        pre_tokenizer: Any = pre_tokenizers.BertPreTokenizer()
        words = _word_counts(normalizer, pre_tokenizer)
        chars = sorted({c for w, _ in words for c in w})
        pieces = [*specials, *chars, *(f"##{c}" for c in chars)]
        pieces += [w for w, _ in words if w not in set(pieces)][: max(0, vocab_size - len(pieces))]
        tok = Tokenizer(models.WordPiece({p: i for i, p in enumerate(pieces)}, unk_token="[UNK]"))
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre_tokenizer
        tok.decoder = decoders.WordPiece()
        cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
        )
        # BERT models take token_type_ids; the plain fast class would not return them.
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            model_input_names=["input_ids", "token_type_ids", "attention_mask"],
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    if kind == "unigram":
        specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
        pre_tokenizer = pre_tokenizers.Metaspace()
        # Punctuation stays a piece of its own (as a trained sentencepiece model would have it).
        words = [
            (w, c) for w, c in _word_counts(None, pre_tokenizer) if not any(ch in ".,;:!?。、—" for ch in w)
        ]
        words += [
            (w.rstrip(".,;:!?。、"), c) for w, c in _word_counts(None, pre_tokenizer) if w[-1] in ".,;:!?。、"
        ]
        total = sum(c for _, c in words)
        chars = sorted({c for w, _ in words for c in w})
        scored = [(sp, 0.0) for sp in specials] + [(c, -20.0) for c in chars]
        seen = {p for p, _ in scored}
        budget = max(0, vocab_size - len(scored))
        merged: dict[str, int] = {}
        for w, c in words:
            if w not in seen:
                merged[w] = merged.get(w, 0) + c
        ranked = sorted(merged.items(), key=lambda kv: (-kv[1], kv[0]))[:budget]
        scored += [(w, math.log(c / total)) for w, c in ranked]
        tok = Tokenizer(models.Unigram(scored, unk_id=specials.index("<unk>")))
        tok.pre_tokenizer = pre_tokenizer
        tok.decoder = decoders.Metaspace()
        bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>",
            pair="<s> $A </s> </s> $B </s>",
            special_tokens=[("<s>", bos), ("</s>", eos)],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="</s>",
            unk_token="<unk>",
            pad_token="<pad>",
            cls_token="<s>",
            sep_token="</s>",
            mask_token="<mask>",
        )
    if kind in ("bpe", "bpe_bos"):
        specials = ["<|endoftext|>", "<bos>"]
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(
            _corpus(),
            trainers.BpeTrainer(
                vocab_size=vocab_size,
                special_tokens=specials,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            ),
        )
        extra: dict[str, Any] = {}
        if kind == "bpe_bos":
            bos = tok.token_to_id("<bos>")
            tok.post_processor = processors.TemplateProcessing(
                single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
            )
            extra["bos_token"] = "<bos>"
        else:
            tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", **extra)
    raise ValueError(f"unknown tiny tokenizer kind {kind!r}")


TOKENIZER_KIND = {
    "bert": "wordpiece",
    "xlm-roberta": "unigram",
    "gpt2": "bpe",
    "llama": "bpe_bos",
    "gemma3_text": "bpe_bos",
    "qwen2": "bpe",
    "bloom": "bpe",
}


def tiny_config(model_type: str, vocab_size: int, **overrides: Any) -> Any:
    """A few-layer config of ``model_type`` (hidden 32, 4 heads, d_ff 64, 3 layers unless overridden)."""
    common: dict[str, Any] = dict(vocab_size=vocab_size, initializer_range=0.2)
    sizes = dict(hidden=32, ff=64, layers=3, heads=4)
    sizes.update({k: overrides.pop(k) for k in list(overrides) if k in sizes})
    h, ff, n, heads = sizes["hidden"], sizes["ff"], sizes["layers"], sizes["heads"]
    # Most families name their sizes the BERT/Llama way; GPT-2 and BLOOM have their own names.
    standard = dict(hidden_size=h, intermediate_size=ff, num_hidden_layers=n, num_attention_heads=heads)
    gqa = dict(num_key_value_heads=2, max_position_embeddings=128)
    families: dict[str, tuple[Any, dict[str, Any]]] = {
        "bert": (BertConfig, {**standard, "max_position_embeddings": 128}),
        "xlm-roberta": (
            XLMRobertaConfig,
            {
                **standard,
                "max_position_embeddings": 130,
                "pad_token_id": 1,
                "bos_token_id": 0,
                "eos_token_id": 2,
            },
        ),
        "gpt2": (GPT2Config, dict(n_embd=h, n_inner=ff, n_layer=n, n_head=heads, n_positions=128)),
        "llama": (LlamaConfig, {**standard, **gqa}),
        "qwen2": (Qwen2Config, {**standard, **gqa}),
        "gemma3_text": (Gemma3TextConfig, {**standard, **gqa, "head_dim": 8, "sliding_window": 8}),
        "bloom": (BloomConfig, dict(hidden_size=h, n_layer=n, n_head=heads)),  # d_ff is fixed at 4·hidden
    }
    if model_type not in families:
        raise ValueError(f"no tiny config for {model_type!r}; choose one of {ARCHITECTURES}")
    config_class, sizes_kwargs = families[model_type]
    # Token ids go to the constructor, which checks them against the vocabulary (GPT-2's default 50256 is not).
    ids = {k: overrides.pop(k) for k in list(overrides) if k.endswith("_token_id")}
    cfg = config_class(**{**sizes_kwargs, **common, **ids})
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model_and_tokenizer(
    model_type: str, seed: int = 0, **overrides: Any
) -> tuple[Any, PreTrainedTokenizerFast]:
    """Build a tiny random-weight LM-head model of ``model_type`` and its tokenizer."""
    tokenizer = tiny_tokenizer(TOKENIZER_KIND[model_type])
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    if ids["bos_token_id"] is None:
        ids["bos_token_id"] = ids["eos_token_id"]  # GPT-2's convention: one <|endoftext|> for both
    ids = {k: v for k, v in ids.items() if v is not None and k not in overrides}
    config = tiny_config(model_type, len(tokenizer), **ids, **overrides)
    torch.manual_seed(seed)
    auto = AutoModelForMaskedLM if model_type in ("bert", "xlm-roberta") else AutoModelForCausalLM
    model = auto.from_config(config)
    return model.eval(), tokenizer
