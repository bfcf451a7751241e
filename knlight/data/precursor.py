"""Reader for the RML-LAMA precursor (heng840/Dataset ``Aligned_my_MLAMA/<lang>.json``).

Its sentences are filled templates whose object was replaced by the empty string, so the slot has to be
found again. What the deletion leaves behind (studied on en, fr, fi, hu, ja, ko):

* en, fr (and some fi/hu/ko/ja): the slot was the last word, so the sentence ends in a space before the
  final punctuation ("Jamie Cullum plays .", "La capitale de Pologne est .", "…のレーベル: 。",
  "Sapsan, a product created by ,"), or simply ends without punctuation ("Israel, which has diplomatic
  relations with"). In en and fr every template has the slot at the end.
* about a third of the entries (3460 of 10091 per language) have no sentence at all.
* mid-sentence deletions leave a double space ("Leicestershire  nevét viseli.", "찰스 배비지는  분야에서");
  in en the only double spaces mid-sentence come from two ParaRel P279 templates ("[X],  a type of [Y].")
  whose slot is at the end: with two candidate places such sentences are ambiguous and dropped.
* fi and hu attach case endings to the object: "soittaa :tä", "Cullum -t játszik" (a space, then ``:`` or
  ``-`` glued to the next word).
* ko attaches particles and the copula to the object: the deletion leaves them as a word of their own
  ("컬럼는 를 연주합니다", "언어는 였습니다.").
* ja has no spaces: the slot follows the subject's topic particle は, and the deletion leaves は directly
  followed by a case particle ("カラムはを演奏します", "ザンビアはと国境を共有"), which is ungrammatical
  and so marks the gap. When は is followed by anything else ("セルビア王国は首都を持つ国家です") the slot
  may be elsewhere: such sentences are dropped.

A sentence is repaired only when exactly one place is found (overlapping signs of the same place count
once); others are dropped and counted. Subjects are not given; they can be recovered from ParaRel (uuid →
English labels) and mParaRel (English labels → Wikidata ids → labels in each language), and are kept only
when they occur in every kept query of the record.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from knlight.data.assemble import fill_label_keys
from knlight.data.pipeline import BuildOptions, BuildReport, Draft, select_names
from knlight.data.records import SLOT
from knlight.errors import DataError
from knlight.io import iter_jsonl, read_json, require_dir

PRECURSOR_LAYOUT = (
    '<root>/Aligned_my_MLAMA/<lang>.json with {uuid: {"sentences", "relation_name", "obj_label"}}'
)

FINAL_PUNCTUATION = ".!?。！？"
# Words that are only a particle: in ko they follow the noun they mark, so standing alone they mark a gap.
# fmt: off
KOREAN_PARTICLES = frozenset((
    "을", "를", "이", "가", "은", "는", "의", "에", "에서", "에게", "와", "과", "로", "으로", "와의", "과의",
    "에서의", "에는", "로서", "으로서", "라는", "이라는", "도", "만", "까지", "부터",
))
# fmt: on
KOREAN_COPULA = re.compile(r"(입니다|였습니다|이었습니다|이다|였다|이었다|이며|였으며)[.!?]?")
JAPANESE_CASE_PARTICLE_AFTER_TOPIC = re.compile(r"は(?=[でとのにがをかへよ])")

# Priority when several signs point at one place: the earlier rule decides how the slot is written.
RULES: tuple[str, ...] = (
    "end_before_punctuation",
    "end_of_sentence",
    "case_suffix",
    "korean_particle",
    "double_space",
    "japanese_particle",
)


@dataclass(frozen=True)
class Gap:
    """A place where the object was deleted.

    Attributes:
        start: First character of the original sentence replaced by the restored text.
        end: End (exclusive) of the replaced characters.
        text: What replaces them (contains ``[Y]``).
        rule: The sign that found the gap (one of :data:`RULES`).
    """

    start: int
    end: int
    text: str
    rule: str


def find_gaps(sentence: str, language: str) -> list[Gap]:
    """Finds every sign of a deleted object slot in a sentence.

    Args:
        sentence: A precursor sentence (no ``[Y]``).
        language: Its language code (some signs are language-specific).

    Returns:
        The candidate gaps, possibly overlapping.
    """
    gaps: list[Gap] = []
    end_match = re.search(rf"(\s+)([{re.escape(FINAL_PUNCTUATION)},]+)\s*$", sentence)
    if end_match:
        gaps.append(Gap(end_match.start(1), end_match.end(1), " " + SLOT, "end_before_punctuation"))
    elif sentence and sentence[-1].isalnum():
        gaps.append(Gap(len(sentence), len(sentence), " " + SLOT, "end_of_sentence"))
    for match in re.finditer(r"(?<=\S)( {2,})(?=\S)", sentence):
        gaps.append(Gap(match.start(1), match.end(1), f" {SLOT} ", "double_space"))
    if language in ("fi", "hu"):
        for match in re.finditer(r"(?<=\s)(?=[:\-]\w)", sentence):
            gaps.append(Gap(match.start() - 1, match.start(), " " + SLOT, "case_suffix"))
    if language == "ko":
        position = 0
        for word in sentence.split(" "):
            bare = word.rstrip(FINAL_PUNCTUATION)
            if bare in KOREAN_PARTICLES or KOREAN_COPULA.fullmatch(word):
                start = max(position - 1, 0)
                gaps.append(Gap(start, position, (" " if position else "") + SLOT, "korean_particle"))
            position += len(word) + 1
    if language == "ja":
        for match in JAPANESE_CASE_PARTICLE_AFTER_TOPIC.finditer(sentence):
            gaps.append(Gap(match.end(), match.end(), SLOT, "japanese_particle"))
    return gaps


def restore_slot(sentence: str, language: str) -> tuple[str | None, str]:
    """Puts ``[Y]`` back where the object was deleted, when that place is unambiguous.

    Args:
        sentence: A precursor sentence.
        language: Its language code.

    Returns:
        ``(query, rule)`` with the repaired query and the rule that found the gap, or ``(None, reason)``
        with reason "slot_not_found" or "slot_ambiguous".
    """
    gaps = sorted(find_gaps(sentence, language), key=lambda gap: (gap.start, gap.end))
    if not gaps:
        return None, "slot_not_found"
    places: list[list[Gap]] = [[gaps[0]]]
    for gap in gaps[1:]:
        if gap.start <= max(other.end for other in places[-1]):
            places[-1].append(gap)
        else:
            places.append([gap])
    if len(places) > 1:
        return None, "slot_ambiguous"
    place = places[0]
    chosen = min(place, key=lambda gap: RULES.index(gap.rule))
    start, end = min(gap.start for gap in place), max(gap.end for gap in place)
    text = chosen.text.lstrip() if start == 0 else chosen.text
    return sentence[:start] + text + sentence[end:], chosen.rule


def slot_is_final(query: str) -> bool:
    """True when only whitespace and final punctuation follow ``[Y]`` (a causal LM can score it)."""
    tail = query[query.index(SLOT) + len(SLOT) :]
    return all(character.isspace() or character in FINAL_PUNCTUATION + "," for character in tail)


@dataclass
class SubjectIndex:
    """Recovered subject labels and entity ids per (uuid, language).

    Attributes:
        labels: ``{(uuid, language): subject label}``.
        subject_ids: ``{uuid: Wikidata id of the subject}``.
        object_ids: ``{uuid: Wikidata id of the object}``.
    """

    labels: dict[tuple[str, str], str]
    subject_ids: dict[str, str]
    object_ids: dict[str, str]


def load_subject_index(
    uuids: Mapping[str, str], languages: list[str], pararel_root: Path | None, mpararel_root: Path | None
) -> SubjectIndex:
    """Recovers subjects: ParaRel gives English labels by uuid, mParaRel maps them to ids and other languages.

    Args:
        uuids: ``{uuid: relation}`` of the facts to look up.
        languages: The languages wanted.
        pararel_root: The ParaRel folder, or None.
        mpararel_root: The mParaRel folder, or None (then only English subjects are recovered).

    Returns:
        The recovered labels and ids.

    Raises:
        DataError: If a given folder lacks the expected files or a line is malformed.
    """
    labels: dict[tuple[str, str], str] = {}
    subject_ids: dict[str, str] = {}
    object_ids: dict[str, str] = {}
    if pararel_root is None:
        return SubjectIndex(labels, subject_ids, object_ids)
    facts_root = require_dir(
        pararel_root / "data" / "trex_lms_vocab",
        "ParaRel facts folder (--pararel_root)",
        "<pararel_root>/data/trex_lms_vocab/<P>.jsonl",
    )
    english: dict[str, tuple[str, str]] = {}
    for relation in sorted(set(uuids.values())):
        path = facts_root / f"{relation}.jsonl"
        if not path.is_file():
            continue
        for _line, data in iter_jsonl(path):
            if data.get("uuid") in uuids:
                english[data["uuid"]] = (str(data.get("sub_label", "")), str(data.get("obj_label", "")))
    for uuid, (subject, _obj) in english.items():
        labels[uuid, "en"] = subject
    if mpararel_root is None:
        return SubjectIndex(labels, subject_ids, object_ids)
    tuples_root = require_dir(
        mpararel_root / "tuples",
        "mParaRel tuples folder (--mpararel_root)",
        "<mpararel_root>/tuples/<lang>/<P>.jsonl",
    )

    def read_tuples(language: str, relation: str) -> list[dict]:
        path = tuples_root / language / f"{relation}.jsonl"
        return [data for _line, data in iter_jsonl(path)] if path.is_file() else []

    uuids_of_relation: dict[str, list[str]] = defaultdict(list)
    for uuid, relation in uuids.items():
        if uuid in english:
            uuids_of_relation[relation].append(uuid)
    for relation, relation_uuids in uuids_of_relation.items():
        ids_by_labels: dict[tuple[str, str], tuple[str, str]] = {
            (str(data.get("sub_label")), str(data.get("obj_label"))): (
                str(data["sub_uri"]),
                str(data["obj_uri"]),
            )
            for data in read_tuples("en", relation)
            if "sub_uri" in data and "obj_uri" in data
        }
        for uuid in relation_uuids:
            ids = ids_by_labels.get(english[uuid])
            if ids is not None:
                subject_ids[uuid], object_ids[uuid] = ids
        uuid_of_ids = {
            (subject_ids[uuid], object_ids[uuid]): uuid for uuid in relation_uuids if uuid in subject_ids
        }
        for language in languages:
            if language == "en":
                continue
            for data in read_tuples(language, relation):
                found = uuid_of_ids.get((str(data.get("sub_uri")), str(data.get("obj_uri"))))
                if found is not None and isinstance(data.get("sub_label"), str):
                    labels[found, language] = data["sub_label"]
    return SubjectIndex(labels, subject_ids, object_ids)


def read_rml_precursor(
    root: Path,
    options: BuildOptions,
    report: BuildReport,
    pararel_root: Path | None = None,
    mpararel_root: Path | None = None,
) -> tuple[list[Draft], list[str]]:
    """Reads the precursor, puts the deleted object slots back and (optionally) recovers subjects.

    Args:
        root: The folder holding ``Aligned_my_MLAMA/``.
        options: The build options (``--model_kind causal`` keeps only queries whose slot is final).
        report: Receives counts per repair rule and per drop reason.
        pararel_root: ParaRel folder, to recover English subjects by uuid.
        mpararel_root: mParaRel folder, to recover subjects in the other languages.

    Returns:
        The drafts and the chosen languages.

    Raises:
        DataError: On a missing folder, malformed file or entry, unknown language/relation or empty selection.
    """
    source = f"RML-LAMA precursor at {root}"
    require_dir(root, "RML-LAMA precursor root", PRECURSOR_LAYOUT)
    data_root = require_dir(root / "Aligned_my_MLAMA", "RML-LAMA precursor data folder", PRECURSOR_LAYOUT)
    available = {path.stem for path in data_root.glob("*.json")}
    languages = select_names(options.languages, available, "--languages", source, "language")
    entries_of: dict[str, dict] = {}
    relation_of: dict[str, str] = {}
    for language in languages:
        path = data_root / f"{language}.json"
        entries = read_json(path)
        if not isinstance(entries, dict):
            raise DataError(f"{path}: expected a JSON object {{uuid: entry}}, got {type(entries).__name__}.")
        for uuid, entry in entries.items():
            _check_entry(path, uuid, entry)
            relation_of.setdefault(uuid, entry["relation_name"])
        entries_of[language] = entries
    relations = select_names(options.relations, set(relation_of.values()), "--relations", source, "relation")
    wanted_relations = set(relations)
    wanted = {uuid: relation for uuid, relation in relation_of.items() if relation in wanted_relations}
    subjects = load_subject_index(wanted, languages, pararel_root, mpararel_root)
    if pararel_root is None:
        report.note('subjects not recovered (pass --pararel_root and --mpararel_root): subject is ""')

    drafts: list[Draft] = []
    for language in languages:
        path = data_root / f"{language}.json"
        for uuid, entry in entries_of[language].items():
            relation = entry["relation_name"]
            if uuid not in wanted:
                continue
            if not entry["sentences"]:
                report.count("records.dropped.no_sentences", language=language)
                continue
            queries: list[str] = []
            for sentence in entry["sentences"]:
                report.count("queries.read", language=language)
                query, rule = restore_slot(sentence, language)
                if query is None:
                    report.count(f"queries.dropped.{rule}", language=language)
                    continue
                if options.model_kind == "causal" and not slot_is_final(query):
                    report.count("queries.dropped.slot_not_final", language=language)
                    continue
                report.count(f"queries.repaired.{rule}", language=language)
                queries.append(query)
            if not queries:
                report.count("records.dropped.no_query_left", language=language)
                continue
            subject = subjects.labels.get((uuid, language), "")
            if subject and not all(subject in query for query in queries):
                report.count("subjects.dropped.not_in_every_query", language=language)
                subject = ""
            report.count("subjects.recovered" if subject else "subjects.unknown", language=language)
            drafts.append(
                Draft(
                    uuid=uuid,
                    relation=relation,
                    language=language,
                    subject=subject,
                    object=entry["obj_label"],
                    object_key=subjects.object_ids.get(uuid, ""),
                    subject_key=subjects.subject_ids.get(uuid, "") or f"uuid:{uuid}",
                    queries=tuple(queries),
                    origin=f"{path}: entry {uuid}",
                    template_origin=f"{path}: entry {uuid}",
                )
            )
    if not drafts:
        raise DataError(
            f"{source}: no query left after repairing the deleted slots"
            + (" and keeping final slots (--model_kind causal)" if options.model_kind == "causal" else "")
            + f" for languages {', '.join(languages)} and relations {', '.join(relations)}; choose others."
        )
    return fill_label_keys(drafts, languages), languages


def _check_entry(path: Path, uuid: str, entry: object) -> None:
    """Validates one precursor entry, naming file and uuid on error."""
    where = f"{path}: entry {uuid!r}"
    if not isinstance(entry, dict):
        raise DataError(f"{where}: expected an object with sentences, relation_name, obj_label.")
    sentences = entry.get("sentences")
    if not isinstance(sentences, list) or not all(isinstance(sentence, str) for sentence in sentences):
        raise DataError(f"{where}: 'sentences' must be a list of strings.")
    for key in ("relation_name", "obj_label"):
        if not isinstance(entry.get(key), str) or not entry[key]:
            raise DataError(f"{where}: missing or empty {key!r}.")
