"""Tiny random-weight models with real tokenizers, built offline (for tests, the tiny configs and benchmarks).

``load_lm("tiny:gpt2")`` (or ``tiny_lm("gpt2")``) builds a few-layer model of a supported architecture through
the real transformers classes, with a tokenizer trained on a small built-in multilingual corpus. Deterministic
for a given seed; nothing is downloaded.
"""

from __future__ import annotations

import functools
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
        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        tok.train_from_iterator(
            _corpus(), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials)
        )
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
        tok = Tokenizer(models.Unigram())
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        tok.train_from_iterator(
            _corpus(),
            trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=specials, unk_token="<unk>"),
        )
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
    if model_type == "bert":
        cfg = BertConfig(
            hidden_size=h,
            intermediate_size=ff,
            num_hidden_layers=n,
            num_attention_heads=heads,
            max_position_embeddings=128,
            **common,
        )
    elif model_type == "xlm-roberta":
        cfg = XLMRobertaConfig(
            hidden_size=h,
            intermediate_size=ff,
            num_hidden_layers=n,
            num_attention_heads=heads,
            max_position_embeddings=130,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            **common,
        )
    elif model_type == "gpt2":
        cfg = GPT2Config(n_embd=h, n_inner=ff, n_layer=n, n_head=heads, n_positions=128, **common)
    elif model_type == "llama":
        cfg = LlamaConfig(
            hidden_size=h,
            intermediate_size=ff,
            num_hidden_layers=n,
            num_attention_heads=heads,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **common,
        )
    elif model_type == "qwen2":
        cfg = Qwen2Config(
            hidden_size=h,
            intermediate_size=ff,
            num_hidden_layers=n,
            num_attention_heads=heads,
            num_key_value_heads=2,
            max_position_embeddings=128,
            **common,
        )
    elif model_type == "gemma3_text":
        cfg = Gemma3TextConfig(
            hidden_size=h,
            intermediate_size=ff,
            num_hidden_layers=n,
            num_attention_heads=heads,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=128,
            sliding_window=8,
            **common,
        )
    elif model_type == "bloom":
        cfg = BloomConfig(hidden_size=h, n_layer=n, n_head=heads, **common)
    else:
        raise ValueError(f"no tiny config for {model_type!r}; choose one of {ARCHITECTURES}")
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model_and_tokenizer(
    model_type: str, seed: int = 0, **overrides: Any
) -> tuple[Any, PreTrainedTokenizerFast]:
    """Build a tiny random-weight LM-head model of ``model_type`` and its tokenizer."""
    tokenizer = tiny_tokenizer(TOKENIZER_KIND[model_type])
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    ids = {k: v for k, v in ids.items() if v is not None and k not in overrides}
    config = tiny_config(model_type, len(tokenizer), **ids, **overrides)
    torch.manual_seed(seed)
    auto = AutoModelForMaskedLM if model_type in ("bert", "xlm-roberta") else AutoModelForCausalLM
    model = auto.from_config(config)
    return model.eval(), tokenizer
