"""Source-independent build steps, part 2: cross-language alignment, subsets, wrong objects, final records."""

from __future__ import annotations

import functools
import logging
import random
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence

from knlight.data.pipeline import (
    BuildOptions,
    BuildReport,
    Draft,
    fill_template,
)
from knlight.data.records import SLOT, SUBJECT_SLOT, FactRecord, query_problem, relation_sort_key
from knlight.data.scripts import lacks_expected_script
from knlight.data.splits import first_by_hash
from knlight.errors import DataError

logger = logging.getLogger(__name__)


def align_languages(
    drafts: Sequence[Draft], languages: Sequence[str], options: BuildOptions, report: BuildReport
) -> dict[str, dict[str, Draft]]:
    """Groups drafts by fact and keeps facts present in every chosen language (with ``--all_languages``).

    Args:
        drafts: Every draft of the selected languages and relations.
        languages: The chosen languages.
        options: The build options.
        report: Receives counts.

    Returns:
        ``{uuid: {language: draft}}`` of the kept facts.

    Raises:
        DataError: If one uuid has different relations or objects across languages, or if no fact is left.
    """
    by_uuid: dict[str, dict[str, Draft]] = defaultdict(dict)
    for draft in drafts:
        languages_of_fact = by_uuid[draft.uuid]
        if draft.language in languages_of_fact:
            first = languages_of_fact[draft.language]
            raise DataError(
                f"{draft.origin}: fact {draft.uuid} appears twice in language {draft.language} (first at "
                f"{first.origin}); remove the duplicate line."
            )
        for other in languages_of_fact.values():
            if (other.relation, other.object_key) != (draft.relation, draft.object_key):
                raise DataError(
                    f"{draft.origin}: fact {draft.uuid} has relation/object "
                    f"{draft.relation}/{draft.object_key} but {other.relation}/{other.object_key} at "
                    f"{other.origin}; the same uuid must denote "
                    "the same fact in every language. Fix the source."
                )
            break
        languages_of_fact[draft.language] = draft
    if not by_uuid:
        raise DataError("no fact was read; check the source folder and the --languages/--relations filters.")
    report.count("facts.read", len(by_uuid))
    if not options.all_languages:
        return dict(by_uuid)
    wanted = set(languages)
    kept = {uuid: per_language for uuid, per_language in by_uuid.items() if wanted <= set(per_language)}
    report.count("facts.dropped.missing_in_some_language", len(by_uuid) - len(kept))
    if not kept:
        facts_per_language = Counter(
            language for per_language in by_uuid.values() for language in per_language
        )
        counts = ", ".join(f"{language} {facts_per_language.get(language, 0)}" for language in languages)
        skipped = Counter(item["language"] for item in report.skipped)
        skipped_text = (
            "; skipped (language, relation) pairs per language: "
            + ", ".join(f"{language} {count}" for language, count in sorted(skipped.items()))
            if skipped
            else ""
        )
        dropped = "; ".join(
            f"{language}: "
            + ", ".join(f"{name} {count}" for name, count in sorted(dropped_of_language.items()))
            for language in languages
            if (
                dropped_of_language := {
                    name: count
                    for name, count in report.per_language[language].items()
                    if name.startswith("records.dropped")
                }
            )
        )
        raise DataError(
            f"after --all_languages true: no fact is present in every language of --languages "
            f"({', '.join(languages)}); facts per language: {counts}{skipped_text}"
            + (f"; records dropped before alignment: {dropped}" if dropped else "")
            + ". Choose fewer languages or pass --all_languages false."
        )
    return kept


def choose_wrong_objects(
    facts: Mapping[str, Mapping[str, Draft]],
    pool: Mapping[str, Mapping[str, Draft]],
    every_draft: Sequence[Draft],
    count: int,
    seed: int,
) -> dict[str, list[str]]:
    """Chooses, for each fact, wrong facts of the same relation whose objects serve as wrong objects.

    The wrong facts are chosen once per fact (by uuid), so every language of a fact gets the objects of the
    same wrong facts, each in its own language. A wrong fact is never one whose object is the true object
    (same object key, or same label in any of the fact's languages), nor another true object of the same
    subject, and the chosen wrong objects are distinct.

    Args:
        facts: The facts that need wrong objects, ``{uuid: {language: draft}}``.
        pool: Facts whose objects may be used, ``{uuid: {language: draft}}`` (the aligned facts).
        every_draft: Every draft read (to know each subject's true objects, even unaligned ones).
        count: Wrong objects per fact.
        seed: The seed.

    Returns:
        ``{uuid: [wrong uuid, ...]}`` (fewer than ``count`` when the relation has too few other objects).
    """
    if count == 0:
        return {uuid: [] for uuid in facts}
    true_keys: dict[tuple[str, str], set[str]] = defaultdict(set)
    true_labels: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for draft in every_draft:
        true_keys[draft.relation, draft.subject_key].add(draft.object_key)
        true_labels[draft.relation, draft.subject_key, draft.language].add(draft.object)
    # One representative fact per (relation, object): the one with most languages, then the smallest uuid.
    representative: dict[tuple[str, str], str] = {}
    for uuid in sorted(pool):
        some_draft = next(iter(pool[uuid].values()))
        key = (some_draft.relation, some_draft.object_key)
        best = representative.get(key)
        if best is None or len(pool[uuid]) > len(pool[best]):
            representative[key] = uuid
    candidates_of_relation: dict[str, list[str]] = defaultdict(list)
    for (relation, _object_key), uuid in sorted(representative.items()):
        candidates_of_relation[relation].append(uuid)

    chosen: dict[str, list[str]] = {}
    for uuid, per_language in facts.items():
        some_draft = next(iter(per_language.values()))
        candidates = candidates_of_relation[some_draft.relation]
        excluded_keys = true_keys[some_draft.relation, some_draft.subject_key]
        used_labels: dict[str, set[str]] = {
            language: set(true_labels[some_draft.relation, some_draft.subject_key, language]) | {draft.object}
            for language, draft in per_language.items()
        }
        picked: list[str] = []
        for index in _random_order(len(candidates), random.Random(f"wrong-objects:{seed}:{uuid}"), count):
            wrong = pool[candidates[index]]
            wrong_key = next(iter(wrong.values())).object_key
            if wrong_key in excluded_keys or not all(language in wrong for language in per_language):
                continue
            if any(wrong[language].object in used_labels[language] for language in per_language):
                continue
            picked.append(candidates[index])
            for language in per_language:
                used_labels[language].add(wrong[language].object)
            if len(picked) == count:
                break
        chosen[uuid] = picked
    return chosen


def _random_order(size: int, rng: random.Random, wanted: int) -> Iterable[int]:
    """Yields indices in a seeded random order, cheaply when only the first few are needed."""
    first = rng.sample(range(size), min(size, 4 * wanted + 8))
    yield from first
    if len(first) < size:
        seen = set(first)
        rest = [index for index in range(size) if index not in seen]
        rng.shuffle(rest)
        yield from rest


def assemble_records(
    drafts: Sequence[Draft], languages: Sequence[str], options: BuildOptions, report: BuildReport
) -> list[FactRecord]:
    """Turns drafts into records: align, subset, choose wrong objects, fill, deduplicate, check scripts.

    Args:
        drafts: Every draft of the selected languages and relations.
        languages: The chosen languages (their order sets the order of records within a fact).
        options: The build options.
        report: Receives counts and warnings.

    Returns:
        Records sorted by relation, fact and language.

    Raises:
        DataError: If a filter leaves nothing (the message names the filter), or with
            ``--strict_scripts`` when a record's text lacks its language's script.
    """
    aligned = align_languages(drafts, languages, options, report)
    by_relation: dict[str, list[str]] = defaultdict(list)
    for uuid, per_language in aligned.items():
        by_relation[next(iter(per_language.values())).relation].append(uuid)
    selected: dict[str, dict[str, Draft]] = {}
    for relation in sorted(by_relation, key=relation_sort_key):
        for uuid in sorted(
            first_by_hash(by_relation[relation], options.max_facts_per_relation, options.seed)
        ):
            selected[uuid] = dict(aligned[uuid])
    report.count("facts.dropped.max_facts_per_relation", len(aligned) - len(selected))
    wrong_facts = choose_wrong_objects(selected, aligned, drafts, options.num_wrong_objects, options.seed)

    language_rank = {language: rank for rank, language in enumerate(languages)}
    records: list[FactRecord] = []
    for uuid, per_language in selected.items():
        short = len(wrong_facts[uuid]) < options.num_wrong_objects
        if short:
            report.count("facts.fewer_wrong_objects_than_asked")
        for language in sorted(per_language, key=lambda name: language_rank.get(name, len(language_rank))):
            draft = per_language[language]
            queries = _final_queries(draft, options, report)
            if not queries:
                report.count("records.dropped.no_valid_query", language=language)
                continue
            _check_script(draft, queries, options, report)
            wrong_objects = [aligned[wrong][language].object for wrong in wrong_facts[uuid]]
            records.append(
                FactRecord(
                    uuid=uuid,
                    relation=draft.relation,
                    language=language,
                    subject=draft.subject,
                    object=draft.object,
                    queries=queries,
                    wrong_objects=wrong_objects,
                )
            )
    if not records:
        raise DataError(
            "no record left after filling the templates (every query was invalid); check the source."
        )
    return records


def _final_queries(draft: Draft, options: BuildOptions, report: BuildReport) -> list[str]:
    """Fills a draft's templates (or takes its queries), drops invalid ones and duplicates."""
    queries = [fill_template(template, draft.subject) for template in draft.templates] + list(draft.queries)
    valid = []
    for query in queries:
        query = query.strip()
        if query_problem(query) is None:
            valid.append(query)
        else:
            report.count("queries.dropped.invalid_after_filling", language=draft.language)
    if options.dedup:
        unique = list(dict.fromkeys(valid))
        if len(unique) < len(valid):
            report.count("queries.dropped.duplicate", len(valid) - len(unique), language=draft.language)
        valid = unique
    return valid


@functools.lru_cache(maxsize=4096)
def _templates_lack_script(language: str, templates: tuple[str, ...]) -> bool:
    texts = [template.replace(SUBJECT_SLOT, " ").replace(SLOT, " ") for template in templates]
    return lacks_expected_script(language, texts)


def _check_script(draft: Draft, queries: Sequence[str], options: BuildOptions, report: BuildReport) -> None:
    """Warns (or fails with ``--strict_scripts``) when a record's text lacks its language's script."""
    if draft.templates and not draft.queries:
        # Template text decides the script; the subject (often a name in another script) does not count.
        flagged = _templates_lack_script(draft.language, tuple(draft.templates))
    else:
        texts = [query.replace(SLOT, " ") for query in queries]
        if draft.subject:
            texts = [text.replace(draft.subject, " ") for text in texts]
        flagged = lacks_expected_script(draft.language, texts)
    if not flagged:
        return
    where = draft.template_origin or draft.origin
    message = (
        f"{where}: fact {draft.uuid} in language {draft.language!r} has no letter in that language's script "
        f"(e.g. {queries[0]!r})"
    )
    if options.strict_scripts:
        raise DataError(f"{message}; fix the templates or drop --strict_scripts to only warn.")
    report.warn("unexpected_script", message)
    report.count("records.unexpected_script", language=draft.language)


def fill_label_keys(drafts: list[Draft], languages: list[str]) -> list[Draft]:
    """Gives drafts without entity ids label-based object/subject keys that agree across languages.

    A fact's key is its label in the first of ``languages`` that has the fact, so every language of the
    fact gets the same key.

    Args:
        drafts: Drafts, some with empty ``object_key`` / ``subject_key``.
        languages: Language preference order.

    Returns:
        The drafts with keys filled in (the same objects, updated in place).
    """
    rank = {language: index for index, language in enumerate(languages)}
    by_uuid: dict[str, list[Draft]] = defaultdict(list)
    for draft in drafts:
        by_uuid[draft.uuid].append(draft)
    for group in by_uuid.values():
        group.sort(key=lambda draft: rank.get(draft.language, len(rank)))
        pivot = group[0]
        object_key = next((draft.object_key for draft in group if draft.object_key), "")
        subject_key = next((draft.subject_key for draft in group if draft.subject_key), "")
        for draft in group:
            draft.object_key = draft.object_key or object_key or f"{pivot.language}:{pivot.object}"
            draft.subject_key = draft.subject_key or subject_key or f"{pivot.language}:{pivot.subject}"
    return drafts
