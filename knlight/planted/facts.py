"""Synthetic multilingual facts for planted-knowledge benchmarks, and a word-level tokenizer for them.

A :class:`FactSet` holds relations, facts (subject → object) and cloze templates in several synthetic
"languages". The languages have **disjoint surface vocabularies**: every word of a language (function words of
the templates and subject names) is built from that language's own syllable inventory (onset consonants that
no other language uses), so no word form is shared between languages. **Objects are shared**: each fact's
object is one language-neutral word (capitalised, from a separate inventory), the same in every language, as
entity names often are in real multilingual data ("Paris", "Tokyo"). Each object is a single token of the
tokenizer built by :func:`build_tokenizer`, whose vocabulary holds every synthetic word as one token.

Templates contain ``[X]`` (the subject) and ``[Y]`` (the object slot). With ``slot="end"`` (for causal LMs)
the slot closes every template; with ``slot="any"`` (masked LMs) the slot may sit anywhere, also before the
subject. Subjects are unique per fact (a subject appears in one relation only), so a fact is identified by its
subject.

Records follow the RML-LAMA format (one per (fact, language), see :mod:`knlight.data.records`)::

    {"uuid": "R0:S00", "relation": "R0", "language": "qaa", "subject": "bagodi", "object": "Zexa",
     "queries": ["kobo bagodi dagu [Y]", ...], "wrong_objects": ["Pihu", ...]}

Language codes come from ISO 639's range reserved for local use (``qaa``–``qtz``).
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

SLOT = "[Y]"
SUBJECT = "[X]"

# Disjoint onset inventories, one per language (at most 6 languages); objects use their own inventory.
_ONSETS = ("bdgk", "fmnl", "rstv", "cjpw", "hqxz", "BDGK")
_VOWELS = "aeiou"
_OBJECT_ONSETS = "ZXPHQ"
LANGUAGE_CODES = ("qaa", "qab", "qac", "qad", "qae", "qaf")

Slot = Literal["end", "any"]


@dataclass(frozen=True)
class SyntheticFact:
    """One fact: a subject (named per language) and its object (shared by all languages).

    Attributes:
        uuid: Fact id, the same in every language (``"<relation>:S<k>"``).
        relation: Relation id (``"R<r>"``).
        object: The object word (one token, language-neutral).
        subjects: Subject name per language code.
    """

    uuid: str
    relation: str
    object: str
    subjects: dict[str, str]


@dataclass
class FactSet:
    """Relations, facts and templates in several synthetic languages.

    Attributes:
        languages: Language codes.
        relations: Relation ids.
        facts: The facts.
        templates: ``templates[relation][language]``: cloze templates with ``[X]`` and ``[Y]``.
        function_words: Template words per language.
        slot: ``"end"`` (slot closes every template) or ``"any"``.
    """

    languages: list[str]
    relations: list[str]
    facts: list[SyntheticFact]
    templates: dict[str, dict[str, list[str]]]
    function_words: dict[str, list[str]] = field(default_factory=dict)
    slot: Slot = "end"

    def objects(self, relation: str) -> list[str]:
        """Objects of the facts of one relation, in fact order."""
        return [f.object for f in self.facts if f.relation == relation]

    def queries(self, fact: SyntheticFact, language: str) -> list[str]:
        """The fact's cloze queries in one language (subject filled in, slot ``[Y]``)."""
        return [t.replace(SUBJECT, fact.subjects[language]) for t in self.templates[fact.relation][language]]

    def records(self) -> list[dict[str, Any]]:
        """RML-LAMA records, one per (fact, language), ordered by fact then language."""
        out = []
        for fact in self.facts:
            wrong = [o for o in self.objects(fact.relation) if o != fact.object]
            for language in self.languages:
                out.append(
                    {
                        "uuid": fact.uuid,
                        "relation": fact.relation,
                        "language": language,
                        "subject": fact.subjects[language],
                        "object": fact.object,
                        "queries": self.queries(fact, language),
                        "wrong_objects": wrong,
                    }
                )
        return out

    def vocabulary(self) -> list[str]:
        """Every word that occurs in the templates, subjects and objects (sorted, no duplicates)."""
        words: set[str] = {f.object for f in self.facts}
        for fact in self.facts:
            words.update(fact.subjects.values())
        for language in self.languages:
            words.update(self.function_words.get(language, []))
        return sorted(words)

    def words_of(self, language: str) -> set[str]:
        """Surface words (function words and subjects) of one language."""
        return set(self.function_words.get(language, [])) | {f.subjects[language] for f in self.facts}


def _word_factory(rng: random.Random, onsets: str, vowels: str, taken: set[str]) -> Any:
    """Return a function that draws fresh pseudo-words of ``n`` syllables from the inventory."""

    def draw(n_syllables: int, capitalise: bool = False) -> str:
        for _ in range(10_000):
            word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(n_syllables))
            word = word.capitalize() if capitalise else word
            if word not in taken:
                taken.add(word)
                return word
        raise RuntimeError(
            f"ran out of {n_syllables}-syllable words for inventory {onsets!r}; use more syllables"
        )

    return draw


def _template(rng: random.Random, pool: list[str], slot: Slot) -> list[str]:
    """One template as a list of tokens (function words, ``[X]``, ``[Y]``)."""
    before = rng.sample(pool, rng.randint(0, 2))
    between = rng.sample(pool, rng.randint(1, 2))
    if slot == "end":
        return [*before, SUBJECT, *between, SLOT]
    after = rng.sample(pool, rng.randint(0, 2))
    if rng.random() < 0.3:  # object slot before the subject (masked LMs only)
        return [*before, SLOT, *between, SUBJECT, *after]
    return [*before, SUBJECT, *between, SLOT, *after]


def make_facts(
    n_relations: int = 3,
    facts_per_relation: int = 4,
    n_languages: int = 3,
    templates_per_relation: int = 4,
    function_words: int = 12,
    slot: Slot = "end",
    seed: int = 0,
) -> FactSet:
    """Generate a synthetic multilingual fact set (deterministic for a seed).

    Args:
        n_relations: Number of relations.
        facts_per_relation: Facts per relation (each with its own subject and object).
        n_languages: Number of languages (1–6), each with a disjoint vocabulary.
        templates_per_relation: Cloze templates per relation and language.
        function_words: Size of each language's pool of template words.
        slot: ``"end"``: the object slot closes every template (causal LMs); ``"any"``: the slot may be
            anywhere, also before the subject (masked LMs).
        seed: Random seed.
    """
    if not 1 <= n_languages <= len(LANGUAGE_CODES):
        raise ValueError(f"n_languages must be in 1..{len(LANGUAGE_CODES)}, got {n_languages}")
    if slot not in ("end", "any"):
        raise ValueError(f"slot must be 'end' or 'any', got {slot!r}")
    if function_words < 4:
        raise ValueError(f"function_words must be >= 4, got {function_words}")
    rng = random.Random(seed)
    languages = list(LANGUAGE_CODES[:n_languages])
    taken: set[str] = set()
    draw = {lang: _word_factory(rng, _ONSETS[i], _VOWELS, taken) for i, lang in enumerate(languages)}
    draw_object = _word_factory(rng, _OBJECT_ONSETS, _VOWELS, taken)
    pools = {lang: [draw[lang](2) for _ in range(function_words)] for lang in languages}
    relations = [f"R{r}" for r in range(n_relations)]
    templates: dict[str, dict[str, list[str]]] = {}
    for relation in relations:
        templates[relation] = {}
        for lang in languages:
            seen: set[tuple[str, ...]] = set()
            chosen: list[str] = []
            for _ in range(1000):
                tokens = tuple(_template(rng, pools[lang], slot))
                if tokens not in seen:
                    seen.add(tokens)
                    chosen.append(" ".join(tokens))
                if len(chosen) == templates_per_relation:
                    break
            templates[relation][lang] = chosen
    facts = []
    for relation, k in itertools.product(relations, range(facts_per_relation)):
        subjects = {lang: draw[lang](3) for lang in languages}
        facts.append(
            SyntheticFact(f"{relation}:S{k:02d}", relation, draw_object(2, capitalise=True), subjects)
        )
    return FactSet(languages, relations, facts, templates, pools, slot)


def build_tokenizer(
    vocabulary: list[str], kind: Literal["masked", "causal", "causal_bos"]
) -> PreTrainedTokenizerFast:
    """A word-level fast tokenizer (whitespace split) in which every word of ``vocabulary`` is one token.

    Args:
        vocabulary: The words.
        kind: ``"masked"`` ([PAD] [UNK] [CLS] [SEP] [MASK]; BERT-style ``[CLS] A [SEP]``), ``"causal"``
            (``<|endoftext|>`` as EOS/pad, GPT-2 style, no BOS) or ``"causal_bos"`` (``<s>`` prepended,
            ``</s>`` EOS, ``<pad>``; Llama style).
    """
    if kind == "masked":
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    elif kind == "causal":
        specials = ["<|endoftext|>", "<unk>"]
    elif kind == "causal_bos":
        specials = ["<pad>", "<unk>", "<s>", "</s>"]
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}; choose 'masked', 'causal' or 'causal_bos'")
    vocab = {tok: i for i, tok in enumerate([*specials, *sorted(set(vocabulary))])}
    unk = specials[1]
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "masked":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B [SEP]",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            unk_token=unk,
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    if kind == "causal":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, unk_token=unk, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
        )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=unk, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
