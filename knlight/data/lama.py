"""Readers of the LAMA-family sources: ParaRel (English paraphrases) and mLAMA-style folders."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from knlight.data.assemble import fill_label_keys
from knlight.data.pipeline import (
    BuildOptions,
    BuildReport,
    Draft,
    select_names,
    template_problem,
)
from knlight.data.records import SLOT, SUBJECT_SLOT
from knlight.data.sources import (
    MLAMA_LAYOUT,
    PARAREL_LAYOUT,
    Pattern,
    check_pattern_selection,
    keep_causal,
    read_patterns,
    stems,
    string_field,
    subdirectories,
)
from knlight.errors import DataError
from knlight.io import iter_jsonl, require_dir, require_file


def read_pararel(root: Path, options: BuildOptions, report: BuildReport) -> tuple[list[Draft], list[str]]:
    """Reads ParaRel (English only): its paraphrase patterns filled with its T-REx facts.

    Args:
        root: The ParaRel folder (with ``data/``).
        options: The build options.
        report: Receives counts and warnings.

    Returns:
        The drafts and the chosen languages (``["en"]``).

    Raises:
        DataError: On a missing folder, malformed line, unknown language/relation or empty selection.
    """
    source = f"ParaRel at {root}"
    require_dir(root, "ParaRel root", PARAREL_LAYOUT)
    patterns_root = require_dir(
        root / "data" / "pattern_data" / "graphs_json", "ParaRel patterns folder", PARAREL_LAYOUT
    )
    facts_root = require_dir(root / "data" / "trex_lms_vocab", "ParaRel facts folder", PARAREL_LAYOUT)
    languages = select_names(options.languages, ["en"], "--languages", source + " (English only)", "language")
    relations = select_names(
        options.relations, stems(patterns_root) & stems(facts_root), "--relations", source, "relation"
    )
    drafts: list[Draft] = []
    pairs_with_templates: dict[tuple[str, str], int] = {}
    for relation in relations:
        patterns_path = patterns_root / f"{relation}.jsonl"
        patterns = read_patterns(patterns_path, ("pattern",), report, "en")
        report.count("patterns.read", len(patterns), language="en")
        patterns = keep_causal(patterns, options, report, "en")
        if not patterns:
            report.skip("en", relation, "no pattern with [Y] after [X] (--model_kind causal)")
            continue
        report.count("patterns.kept", len(patterns), language="en")
        templates = tuple(pattern.text for pattern in patterns)
        pairs_with_templates["en", relation] = len(templates)
        facts_path = facts_root / f"{relation}.jsonl"
        for line_number, data in iter_jsonl(facts_path):
            origin = f"{facts_path}:{line_number}"
            subject, obj = string_field(data, "sub_label", origin), string_field(data, "obj_label", origin)
            uuid = string_field(data, "uuid", origin)
            drafts.append(
                Draft(
                    uuid,
                    relation,
                    "en",
                    subject,
                    obj,
                    obj,
                    subject,
                    templates,
                    (),
                    origin,
                    str(patterns_path),
                )
            )
    check_pattern_selection(pairs_with_templates, report, source)
    return drafts, languages


def read_mlama(root: Path, options: BuildOptions, report: BuildReport) -> tuple[list[Draft], list[str]]:
    """Reads the mLAMA layout: per language, ``templates.jsonl`` (several per relation) and fact files.

    Facts align across languages on their ``uuid`` (or ``<P>:<sub_uri>:<obj_uri>`` when a line has no
    uuid); objects are identified by ``obj_uri`` when given, else by their label in the first chosen
    language that has the fact.

    Args:
        root: The folder holding one subfolder per language.
        options: The build options.
        report: Receives counts and warnings.

    Returns:
        The drafts and the chosen languages.

    Raises:
        DataError: On a missing folder/file, malformed line, unknown language/relation or empty selection.
    """
    source = f"mLAMA layout at {root}"
    require_dir(root, "mLAMA root", MLAMA_LAYOUT)
    for language in options.languages or ():
        if (root / language).is_dir():  # the language is there but incomplete: name the missing file
            require_file(root / language / "templates.jsonl", "templates file", MLAMA_LAYOUT)
    available = {name for name in subdirectories(root) if (root / name / "templates.jsonl").is_file()}
    if not available:
        raise DataError(f"{root}: no <lang>/templates.jsonl found; expected the layout {MLAMA_LAYOUT}.")
    languages = select_names(options.languages, available, "--languages", source, "language")
    templates_of: dict[str, dict[str, list[Pattern]]] = {}
    for language in languages:
        templates_path = require_file(root / language / "templates.jsonl", "templates file", MLAMA_LAYOUT)
        by_relation: dict[str, list[Pattern]] = defaultdict(list)
        for line_number, data in iter_jsonl(templates_path):
            origin = f"{templates_path}:{line_number}"
            relation = string_field(data, "relation", origin)
            key = "template" if "template" in data else "pattern" if "pattern" in data else None
            if key is None:
                raise DataError(f"{origin}: no 'template' key; each line needs the template text.")
            problem = template_problem(data[key])
            if problem:
                report.warn("invalid_pattern", f"{origin}: skipped template: {problem}")
                report.count("patterns.invalid", language=language)
                by_relation.setdefault(relation, [])
                continue
            by_relation[relation].append(Pattern(data[key], None, origin))
        if by_relation and not any(by_relation.values()):
            raise DataError(
                f"{templates_path}: every template lacks a single {SUBJECT_SLOT} or {SLOT}; mark the "
                f"subject with {SUBJECT_SLOT} and the object with {SLOT}."
            )
        templates_of[language] = by_relation
    available_relations = {
        relation
        for language in languages
        for relation in templates_of[language]
        if (root / language / f"{relation}.jsonl").is_file()
    }
    relations = select_names(options.relations, available_relations, "--relations", source, "relation")
    drafts: list[Draft] = []
    pairs_with_templates: dict[tuple[str, str], int] = {}
    for language in languages:
        for relation in relations:
            facts_path = root / language / f"{relation}.jsonl"
            patterns = templates_of[language].get(relation, [])
            if not facts_path.is_file() or not patterns:
                report.skip(language, relation, "no facts file" if patterns else "no valid template")
                continue
            report.count("patterns.read", len(patterns), language=language)
            patterns = keep_causal(patterns, options, report, language)
            if not patterns:
                report.skip(language, relation, "no template with [Y] after [X] (--model_kind causal)")
                continue
            report.count("patterns.kept", len(patterns), language=language)
            templates = tuple(pattern.text for pattern in patterns)
            pairs_with_templates[language, relation] = len(templates)
            template_origin = str(root / language / "templates.jsonl")
            for line_number, data in iter_jsonl(facts_path):
                origin = f"{facts_path}:{line_number}"
                subject, obj = (
                    string_field(data, "sub_label", origin),
                    string_field(data, "obj_label", origin),
                )
                uuid = data.get("uuid")
                if not isinstance(uuid, str) or not uuid:
                    if not (isinstance(data.get("sub_uri"), str) and isinstance(data.get("obj_uri"), str)):
                        raise DataError(
                            f"{origin}: no 'uuid' and no 'sub_uri'/'obj_uri'; each fact needs an identifier "
                            "shared across languages."
                        )
                    uuid = f"{relation}:{data['sub_uri']}:{data['obj_uri']}"
                obj_uri = data.get("obj_uri") if isinstance(data.get("obj_uri"), str) else None
                sub_uri = data.get("sub_uri") if isinstance(data.get("sub_uri"), str) else None
                drafts.append(
                    Draft(
                        uuid=uuid,
                        relation=relation,
                        language=language,
                        subject=subject,
                        object=obj,
                        object_key=obj_uri or "",
                        subject_key=sub_uri or "",
                        templates=templates,
                        origin=origin,
                        template_origin=template_origin,
                    )
                )
    check_pattern_selection(pairs_with_templates, report, source)
    return fill_label_keys(drafts, languages), languages
