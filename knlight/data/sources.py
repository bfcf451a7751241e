"""Readers for the template-based sources: mParaRel, ParaRel and the mLAMA layout.

Each reader validates its folder layout, applies the language/relation/pattern filters and returns
:class:`~knlight.data.pipeline.Draft` objects plus the chosen languages.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from knlight.data.pipeline import (
    BuildOptions,
    BuildReport,
    Draft,
    select_names,
    slot_after_subject,
    template_problem,
)
from knlight.data.records import SLOT, SUBJECT_SLOT
from knlight.errors import DataError
from knlight.io import iter_jsonl, require_dir

MPARAREL_LAYOUT = (
    "<root>/patterns/<lang>/<P>.jsonl and <root>/tuples/<lang>/<P>.jsonl (mParaRel reviewed release)"
)
PARAREL_LAYOUT = (
    "<root>/data/pattern_data/graphs_json/<P>.jsonl and <root>/data/trex_lms_vocab/<P>.jsonl (ParaRel)"
)
MLAMA_LAYOUT = "<root>/<lang>/templates.jsonl and <root>/<lang>/<P>.jsonl (mLAMA)"


@dataclass
class Pattern:
    """A template read from a patterns file.

    Attributes:
        text: The template with ``[X]`` and ``[Y]``.
        checked_by_human: The source's review flag (None when the source has no such flag).
        origin: ``file:line``.
    """

    text: str
    checked_by_human: bool | None
    origin: str


def read_patterns(
    path: Path, text_keys: Iterable[str], report: BuildReport | None, language: str
) -> list[Pattern]:
    """Reads a patterns file, skipping (and counting) patterns without exactly one ``[X]`` and ``[Y]``.

    Args:
        path: The JSONL file.
        text_keys: Keys that may hold the template text (the first present one is used).
        report: Receives warnings about invalid patterns; None reads silently.
        language: The language, for per-language counts.

    Returns:
        The valid patterns.

    Raises:
        DataError: If a line is malformed, has no template key, or if every pattern in the file is invalid.
    """
    text_keys = tuple(text_keys)
    valid: list[Pattern] = []
    invalid = 0
    for line_number, data in iter_jsonl(path):
        origin = f"{path}:{line_number}"
        key = next((key for key in text_keys if key in data), None)
        if key is None:
            raise DataError(f"{origin}: no {' or '.join(text_keys)} key; each line needs the template text.")
        problem = template_problem(data[key])
        if problem:
            invalid += 1
            if report is not None:
                report.warn("invalid_pattern", f"{origin}: skipped pattern: {problem}")
                report.count("patterns.invalid", language=language)
            continue
        checked = data.get("checked-by-human")
        valid.append(Pattern(data[key], checked if isinstance(checked, bool) else None, origin))
    if invalid and not valid:
        raise DataError(
            f"{path}: every pattern ({invalid}) lacks a single {SUBJECT_SLOT} or {SLOT}; mark the subject "
            f"with {SUBJECT_SLOT} and the object with {SLOT} in each template."
        )
    return valid


def keep_causal(
    patterns: list[Pattern], options: BuildOptions, report: BuildReport, language: str
) -> list[Pattern]:
    """With ``--model_kind causal``, drops patterns whose object slot precedes the subject."""
    if options.model_kind != "causal":
        return patterns
    kept = [pattern for pattern in patterns if slot_after_subject(pattern.text)]
    report.count("patterns.dropped.slot_before_subject", len(patterns) - len(kept), language=language)
    return kept


def subdirectories(path: Path) -> set[str]:
    return {child.name for child in path.iterdir() if child.is_dir()}


def stems(path: Path, suffix: str = ".jsonl") -> set[str]:
    return (
        {child.name[: -len(suffix)] for child in path.iterdir() if child.name.endswith(suffix)}
        if path.is_dir()
        else set()
    )


def string_field(data: dict, key: str, origin: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{origin}: missing or empty {key!r}; each fact line needs it as a non-empty string.")
    return value


def check_pattern_selection(pairs_with_templates: dict, report: BuildReport, source: str) -> None:
    """Raises a DataError naming the filters that left no (language, relation) pair with templates."""
    if pairs_with_templates:
        return
    reasons = Counter(re.sub(r" [^ ]*\.jsonl$", "", item["reason"]) for item in report.skipped)
    summary = "; ".join(f"{reason} ({count} pairs)" for reason, count in reasons.most_common())
    raise DataError(
        f"{source}: no (language, relation) pair has templates and facts left after the filters: "
        f"{summary or 'nothing to read'}. Relax the filter named above or choose other languages/relations."
    )


def read_mpararel(
    root: Path,
    options: BuildOptions,
    report: BuildReport,
    all_patterns: bool = False,
    unreviewed_languages: str = "keep",
) -> tuple[list[Draft], list[str]]:
    """Reads mParaRel: aligns facts on (relation, sub_uri, obj_uri) and fills each language's patterns.

    The ``checked-by-human`` flag only exists where reviewers worked: in this release some languages
    (e.g. zh-hans, fr, de, es, it) have reviewed patterns, others (e.g. en, whose patterns are ParaRel's
    human-written originals, and ru, ja, ko, fi, hu, ar) have none flagged at all. So the flag is used
    where it was set: in a reviewed language only human-checked patterns are kept (a relation without any
    is skipped); an unreviewed language keeps all its patterns, or is skipped with
    ``unreviewed_languages="skip"``. ``all_patterns`` keeps every pattern everywhere.

    Args:
        root: The mParaRel folder (with ``patterns/`` and ``tuples/``).
        options: The build options.
        report: Receives counts, skipped pairs and warnings.
        all_patterns: Keep patterns that reviewers did not check.
        unreviewed_languages: "keep" or "skip" languages where no pattern was reviewed.

    Returns:
        The drafts and the chosen languages.

    Raises:
        DataError: On a missing folder, malformed line, unknown language/relation or empty selection.
    """
    if unreviewed_languages not in ("keep", "skip"):
        raise DataError(f"--unreviewed_languages {unreviewed_languages!r}: choose keep or skip.")
    source = f"mParaRel at {root}"
    require_dir(root, "mParaRel root", MPARAREL_LAYOUT)
    patterns_root = require_dir(root / "patterns", "mParaRel patterns folder", MPARAREL_LAYOUT)
    tuples_root = require_dir(root / "tuples", "mParaRel tuples folder", MPARAREL_LAYOUT)
    with_patterns, with_tuples = subdirectories(patterns_root), subdirectories(tuples_root)
    pattern_only = sorted(with_patterns - with_tuples)
    requested_pattern_only = [code for code in options.languages or () if code in pattern_only]
    if requested_pattern_only:
        raise DataError(
            f"--languages: {', '.join(requested_pattern_only)}: patterns but no tuples in {tuples_root}; "
            f"languages with both: {', '.join(sorted(with_patterns & with_tuples))}."
        )
    languages = select_names(
        options.languages, with_patterns & with_tuples, "--languages", source, "language"
    )
    available_relations = set().union(*(stems(tuples_root / language) for language in languages))
    relations = select_names(options.relations, available_relations, "--relations", source, "relation")

    drafts: list[Draft] = []
    pairs_with_templates: dict[tuple[str, str], int] = {}
    for language in languages:
        pattern_files = {
            stem: patterns_root / language / f"{stem}.jsonl" for stem in stems(patterns_root / language)
        }
        selected = set(relations)
        patterns_of = {
            relation: read_patterns(path, ("pattern",), report if relation in selected else None, language)
            for relation, path in pattern_files.items()
        }
        reviewed = any(pattern.checked_by_human for patterns in patterns_of.values() for pattern in patterns)
        report.per_language[language]["reviewed"] = int(reviewed)
        if not reviewed and not all_patterns:
            if unreviewed_languages == "skip":
                report.note(
                    f"{language}: no pattern is checked-by-human; skipped (--unreviewed_languages skip)"
                )
                for relation in relations:
                    report.skip(language, relation, "language has no human-checked pattern")
                continue
            report.note(
                f"{language}: no pattern is checked-by-human in any relation (never reviewed); all its "
                "patterns are kept"
            )
        for relation in relations:
            tuples_path = tuples_root / language / f"{relation}.jsonl"
            if not tuples_path.is_file():
                report.skip(language, relation, f"no tuples file {tuples_path}")
                continue
            if relation not in patterns_of:
                report.skip(
                    language, relation, f"no patterns file {patterns_root / language / relation}.jsonl"
                )
                continue
            patterns = patterns_of[relation]
            report.count("patterns.read", len(patterns), language=language)
            if reviewed and not all_patterns:
                checked = [pattern for pattern in patterns if pattern.checked_by_human]
                report.count(
                    "patterns.dropped.not_human_checked", len(patterns) - len(checked), language=language
                )
                if not checked:
                    report.skip(
                        language, relation, "no human-checked pattern (pass --all_patterns true to keep all)"
                    )
                    continue
                patterns = checked
            patterns = keep_causal(patterns, options, report, language)
            if not patterns:
                report.skip(language, relation, "no pattern with [Y] after [X] (--model_kind causal)")
                continue
            report.count("patterns.kept", len(patterns), language=language)
            templates = tuple(pattern.text for pattern in patterns)
            pairs_with_templates[language, relation] = len(templates)
            template_origin = str(patterns_root / language / f"{relation}.jsonl")
            for line_number, data in iter_jsonl(tuples_path):
                origin = f"{tuples_path}:{line_number}"
                sub_uri, obj_uri = (
                    string_field(data, "sub_uri", origin),
                    string_field(data, "obj_uri", origin),
                )
                subject, obj = (
                    string_field(data, "sub_label", origin),
                    string_field(data, "obj_label", origin),
                )
                if SLOT in subject or SUBJECT_SLOT in subject:
                    report.count("facts.dropped.slot_marker_in_subject", language=language)
                    continue
                drafts.append(
                    Draft(
                        uuid=f"{relation}:{sub_uri}:{obj_uri}",
                        relation=relation,
                        language=language,
                        subject=subject,
                        object=obj,
                        object_key=obj_uri,
                        subject_key=sub_uri,
                        templates=templates,
                        origin=origin,
                        template_origin=template_origin,
                    )
                )
    check_pattern_selection(pairs_with_templates, report, source)
    return drafts, languages
