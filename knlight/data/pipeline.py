"""Source-independent build steps, part 1: the options, the report, drafts, name selection, templates.

Every source reader turns its files into :class:`Draft` objects (one fact in one language, with either
templates still to fill or queries already filled); :func:`knlight.data.assemble.assemble_records` turns
drafts into records.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from knlight.data.records import SLOT, SUBJECT_SLOT, relation_sort_key
from knlight.errors import DataError

logger = logging.getLogger(__name__)

MODEL_KINDS: tuple[str, ...] = ("masked", "causal")
MAX_LISTED = 50  # cap on examples kept in the manifest per kind of warning; counts are always complete


@dataclass
class BuildOptions:
    """Options shared by every builder (see ``python -m knlight.data.build <source> --help``).

    Attributes:
        languages: Language codes to keep; None keeps every language of the source.
        relations: Relation ids to keep; None keeps every relation.
        max_facts_per_relation: Keep at most this many facts per relation (a seeded, order-independent
            choice); None keeps all.
        all_languages: Keep only facts present in every chosen language.
        model_kind: "masked", or "causal" (the object slot must come after the subject).
        dedup: Drop repeated queries within a record.
        num_wrong_objects: Wrong objects per record (objects of other facts of the same relation).
        seed: Seed of the subset and wrong-object choices.
        strict_scripts: Make "language written in an unexpected script" an error instead of a warning.
    """

    languages: list[str] | None = None
    relations: list[str] | None = None
    max_facts_per_relation: int | None = None
    all_languages: bool = True
    model_kind: str = "masked"
    dedup: bool = True
    num_wrong_objects: int = 3
    seed: int = 0
    strict_scripts: bool = False

    def __post_init__(self) -> None:
        if self.model_kind not in MODEL_KINDS:
            raise DataError(f"--model_kind {self.model_kind!r}: choose one of {', '.join(MODEL_KINDS)}.")
        if self.max_facts_per_relation is not None and self.max_facts_per_relation < 1:
            raise DataError(
                f"--max_facts_per_relation {self.max_facts_per_relation}: give a positive number, or omit it "
                "to keep every fact."
            )
        if self.num_wrong_objects < 0:
            raise DataError(f"--num_wrong_objects {self.num_wrong_objects}: give 0 or a positive number.")
        for name in ("languages", "relations"):
            value = getattr(self, name)
            if value is not None and not value:
                raise DataError(f"--{name} is an empty list; omit it to keep all, or list at least one.")

    def to_manifest(self) -> dict[str, Any]:
        """Returns the options as a JSON-ready dict."""
        return asdict(self)


@dataclass
class BuildReport:
    """What a build kept, dropped and warned about; becomes part of the manifest.

    Attributes:
        counters: Named counts, e.g. ``"queries.dropped.slot_not_found"``.
        per_language: Named counts per language, e.g. patterns kept per language.
        skipped: (language, relation) pairs left out, each with the reason.
        warnings: Warning messages (at most :data:`MAX_LISTED` per kind; see counters for totals).
        notes: Facts about the source worth knowing when reading the output.
    """

    counters: Counter[str] = field(default_factory=Counter)
    per_language: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    skipped: list[dict[str, str]] = field(default_factory=list)
    warnings: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    notes: list[str] = field(default_factory=list)

    def count(self, name: str, amount: int = 1, language: str | None = None) -> None:
        """Adds to a counter (and to the language's counter when a language is given)."""
        self.counters[name] += amount
        if language is not None:
            self.per_language[language][name] += amount

    def skip(self, language: str, relation: str, reason: str) -> None:
        """Records that a (language, relation) pair was left out, and why."""
        self.skipped.append({"language": language, "relation": relation, "reason": reason})

    def warn(self, kind: str, message: str) -> None:
        """Counts a warning of some kind and keeps its message (up to :data:`MAX_LISTED` per kind)."""
        self.counters[f"warnings.{kind}"] += 1
        if len(self.warnings[kind]) < MAX_LISTED:
            self.warnings[kind].append(message)
            logger.warning("%s", message)

    def note(self, message: str) -> None:
        """Keeps a remark about the source for the manifest."""
        self.notes.append(message)
        logger.info("%s", message)

    def to_manifest(self) -> dict[str, Any]:
        """Returns the report as a JSON-ready dict."""
        return {
            "counters": dict(sorted(self.counters.items())),
            "per_language": {
                language: dict(sorted(counts.items()))
                for language, counts in sorted(self.per_language.items())
            },
            "skipped": self.skipped,
            "warnings": {kind: messages for kind, messages in sorted(self.warnings.items())},
            "notes": self.notes,
        }


@dataclass
class Draft:
    """One fact in one language as read from a source, before alignment and filling.

    Attributes:
        uuid: Fact identifier, the same in every language.
        relation: Relation id.
        language: Language code.
        subject: Subject label ("" when unknown).
        object: Object label.
        object_key: Identifies the object across languages (an entity id when the source has one).
        subject_key: Identifies the subject across languages (to exclude a subject's other true objects
            from its wrong objects).
        templates: Patterns with ``[X]`` and ``[Y]`` still to fill with the subject.
        queries: Already-filled queries (sources that give sentences rather than templates).
        origin: Where the draft came from (``file:line``), for messages.
        template_origin: Where the templates came from, for messages.
    """

    uuid: str
    relation: str
    language: str
    subject: str
    object: str
    object_key: str
    subject_key: str
    templates: Sequence[str] = ()
    queries: Sequence[str] = ()
    origin: str = ""
    template_origin: str = ""


def select_names(
    requested: Sequence[str] | None, available: Iterable[str], option: str, source: str, what: str
) -> list[str]:
    """Validates a ``--languages`` / ``--relations`` selection against what a source has.

    Args:
        requested: The requested names, or None for all.
        available: What the source has.
        option: The option name for messages, e.g. "--languages".
        source: The source description for messages, e.g. "mParaRel at ../shared/data/mpararel".
        what: "language" or "relation".

    Returns:
        The selected names, in the requested order (or sorted when all are kept).

    Raises:
        DataError: If the source has nothing, or a requested name is not available.
    """
    sort_key = relation_sort_key if what == "relation" else str
    available_sorted = sorted(set(available), key=sort_key)
    if not available_sorted:
        raise DataError(f"{source}: no {what} found; check the folder layout.")
    if requested is None:
        return available_sorted
    unknown = [name for name in requested if name not in set(available_sorted)]
    if unknown:
        listed = ", ".join(available_sorted)
        if len(unknown) == len(requested):
            raise DataError(f"after {option} {' '.join(requested)}: no {what} left; {source} has: {listed}.")
        raise DataError(
            f"{option}: unknown {what}(s) {', '.join(unknown)} for {source}; available: {listed}. "
            "Fix or remove them."
        )
    return list(dict.fromkeys(requested))


def template_problem(pattern: Any) -> str | None:
    """Says what is wrong with a template, or returns None when it has one ``[X]`` and one ``[Y]``."""
    if not isinstance(pattern, str):
        return f"pattern must be a string, got {type(pattern).__name__}"
    problems = [
        f"{slot} appears {pattern.count(slot)} times"
        for slot in (SUBJECT_SLOT, SLOT)
        if pattern.count(slot) != 1
    ]
    return f"{'; '.join(problems)} (need exactly one each) in {pattern!r}" if problems else None


def slot_after_subject(pattern: str) -> bool:
    """True when the object slot comes after the subject slot (what a causal LM can score)."""
    return pattern.index(SLOT) > pattern.index(SUBJECT_SLOT)


def fill_template(template: str, subject: str) -> str:
    """Fills the subject into a template, leaving the object slot."""
    return template.replace(SUBJECT_SLOT, subject)
