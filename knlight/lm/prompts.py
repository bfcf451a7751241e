"""Turn a cloze query with an object slot ``[Y]`` and its answer into model inputs and target positions."""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from knlight.errors import KnlightError

SLOT = "[Y]"


class QueryError(KnlightError, ValueError):
    """A query or answer that cannot be turned into an attribution target."""


@dataclass(frozen=True)
class EncodedQuery:
    """One (query, answer) pair ready for a model.

    Attributes:
        input_ids: The sequence fed to the model. Masked LMs: the full sentence with one mask per answer token.
            Causal LMs: the prompt (text before the slot) followed by the answer minus its last token, so the
            gold prefix is teacher-forced.
        targets: One ``(position, token_id)`` per answer token: the position whose output predicts that token.
        words: Token positions of each word of the query (not the answer, not special tokens); the AMIG
            baseline replaces one word at a time.
    """

    input_ids: tuple[int, ...]
    targets: tuple[tuple[int, int], ...]
    words: tuple[tuple[int, ...], ...]


def _is_cjk(text: str) -> bool:
    return any(
        unicodedata.name(ch, "").startswith(("CJK", "HIRAGANA", "KATAKANA", "HANGUL", "THAI")) for ch in text
    )


def _split_query(query: str) -> tuple[str, str]:
    count = query.count(SLOT)
    if count != 1:
        raise QueryError(
            f"query {query!r} must contain the object slot {SLOT} exactly once (found {count}); write the "
            f"cloze with {SLOT} where the answer goes, e.g. 'The capital of France is {SLOT}.'"
        )
    prefix, suffix = query.split(SLOT)
    return prefix, suffix


def encode_query(
    tokenizer: PreTrainedTokenizerBase, query: str, answer: str, *, masked: bool, mask_token_id: int | None
) -> EncodedQuery:
    """Encode one query for a masked or causal LM (see :class:`EncodedQuery`).

    Causal LMs use the text before the slot as the prompt and drop any tail after it. The answer's tokens are
    found in the context of the filled sentence (so BPE leading-space conventions are respected); when a token
    straddles the answer boundary the pieces are tokenised separately instead.

    Raises:
        QueryError: no/duplicate slot, empty answer, nothing before the slot of a causal query, or a masked
            model without a mask token.
    """
    prefix, suffix = _split_query(query)
    if not answer.strip():
        raise QueryError(f"answer {answer!r} of query {query!r} is empty; give the object's surface form")
    if not masked:
        suffix = ""
    elif mask_token_id is None:
        raise QueryError(
            "the tokenizer has no mask token, but the model is a masked LM; pass its real tokenizer"
        )
    ids, answer_pos, special, word_ids, spans = _tokenize_in_context(tokenizer, prefix, answer, suffix)
    if not answer_pos:
        raise QueryError(f"answer {answer!r} of query {query!r} tokenises to nothing")
    first, last = answer_pos[0], answer_pos[-1]
    if masked:
        input_ids = list(ids)
        for p in answer_pos:
            input_ids[p] = int(mask_token_id)  # type: ignore[arg-type]
        targets = tuple((p, ids[p]) for p in answer_pos)
        context = [p for p in range(len(ids)) if p not in answer_pos and not special[p]]
    else:
        if first == 0:
            raise QueryError(
                f"causal query {query!r} has nothing before the slot {SLOT} (and the tokenizer adds no BOS); "
                "a causal LM needs a prompt that precedes the answer"
            )
        input_ids = list(ids[:last])
        targets = tuple((p - 1, ids[p]) for p in answer_pos)
        context = [p for p in range(first) if not special[p]]
    return EncodedQuery(tuple(input_ids), targets, _group_words(tokenizer, ids, context, word_ids, spans))


Spans = list[tuple[int, int, str] | None]


def _tokenize_in_context(
    tokenizer: PreTrainedTokenizerBase, prefix: str, answer: str, suffix: str
) -> tuple[list[int], list[int], list[bool], list[int | None], Spans]:
    """Return ids, answer positions, special-token flags, word ids and the text span of each token (start,
    end, text; None when unknown) of ``prefix + answer + suffix``."""
    text = prefix + answer + suffix
    start, end = len(prefix), len(prefix) + len(answer)
    if tokenizer.is_fast:
        enc = tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
        ids = list(enc["input_ids"])
        special = [bool(s) for s in enc["special_tokens_mask"]]
        answer_pos: list[int] = []
        straddles = False
        for pos, (a, b) in enumerate(enc["offset_mapping"]):
            if special[pos] or b <= a:
                continue
            piece = text[a:b]
            a2 = a + len(piece) - len(piece.lstrip())
            b2 = b - (len(piece) - len(piece.rstrip()))
            if a2 < end and b2 > start:
                answer_pos.append(pos)
                straddles |= a2 < start or b2 > end
        contiguous = answer_pos == list(range(answer_pos[0], answer_pos[-1] + 1)) if answer_pos else True
        if not straddles and contiguous:
            spans: Spans = [(a, b, text[a:b]) for a, b in enc["offset_mapping"]]
            return ids, answer_pos, special, list(enc.word_ids()), spans
    # Fallback: tokenise the three pieces separately and wrap them in the tokenizer's special tokens.
    pieces = [
        tokenizer(p, add_special_tokens=False)["input_ids"] if p else [] for p in (prefix, answer, suffix)
    ]
    before, after = _special_wrapping(tokenizer)
    ids = [*before, *pieces[0], *pieces[1], *pieces[2], *after]
    special = [True] * len(before) + [False] * (len(ids) - len(before) - len(after)) + [True] * len(after)
    start_answer = len(before) + len(pieces[0])
    answer_pos = list(range(start_answer, start_answer + len(pieces[1])))
    return ids, answer_pos, special, [None if s else i for i, s in enumerate(special)], [None] * len(ids)


def _special_wrapping(tokenizer: PreTrainedTokenizerBase) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a single text (e.g. [CLS] … [SEP], or BOS …)."""
    probe = "x"
    body = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe)["input_ids"])
    for i in range(len(full) - len(body) + 1):
        if full[i : i + len(body)] == body:
            return full[:i], full[i + len(body) :]
    return [], []


def _group_words(
    tokenizer: PreTrainedTokenizerBase,
    ids: list[int],
    context: list[int],
    word_ids: list[int | None],
    spans: Spans,
) -> tuple[tuple[int, ...], ...]:
    """Group context positions into words; scripts without spaces count each token as a word.

    A CJK token is read from the text it covers (byte-level BPE splits a character into several tokens that
    decode to nothing readable, and a token may end inside the next character): consecutive CJK tokens whose
    character spans overlap form one word (the smallest unit that can be replaced whole); a token covering
    several characters is one word.
    """
    groups: dict[object, list[int]] = {}
    span_group: tuple[int, int] | None = None  # (group key id, end of its character span)
    for pos in context:
        key: object = word_ids[pos] if word_ids[pos] is not None else ("tok", pos)
        span = spans[pos]
        if span is not None and _is_cjk(span[2]):
            start, end, _ = span
            if span_group is not None and start < span_group[1]:
                key, span_group = ("span", span_group[0]), (span_group[0], max(end, span_group[1]))
            else:
                key, span_group = ("span", pos), (pos, end)
        else:
            span_group = None
            if span is None and _is_cjk(str(tokenizer.decode([ids[pos]]))):
                key = ("tok", pos)
        groups.setdefault(key, []).append(pos)
    return tuple(tuple(g) for g in groups.values())
