"""Builders on the real sources in ../shared/data (skipped when that folder is absent)."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest

from knlight.data import FactRecord, read_manifest, read_records
from knlight.data.build import build_mlama, build_mpararel, build_pararel, build_rml_precursor, main
from knlight.data.pipeline import BuildOptions
from knlight.io import iter_jsonl

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MPARAREL = SHARED_DATA / "mpararel"
PARAREL = SHARED_DATA / "pararel"
PRECURSOR = SHARED_DATA / "rml-lama-precursor"
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "rml_small.jsonl"

pytestmark = pytest.mark.skipif(
    not (MPARAREL.is_dir() and PARAREL.is_dir() and PRECURSOR.is_dir()),
    reason=f"real data not found at {SHARED_DATA} (expected ../shared/data beside the repository)",
)


def by_fact(records: list[FactRecord]) -> dict[str, dict[str, FactRecord]]:
    facts: dict[str, dict[str, FactRecord]] = defaultdict(dict)
    for record in records:
        facts[record.uuid][record.language] = record
    return facts


def assert_well_formed(records: list[FactRecord]) -> None:
    for record in records:
        assert record.queries
        for query in record.queries:
            assert query.count("[Y]") == 1 and "[X]" not in query
            if record.subject:
                assert record.subject in query
        assert record.object not in record.wrong_objects
        assert len(set(record.queries)) == len(record.queries)


@pytest.fixture(scope="module")
def capitals() -> tuple[list[FactRecord], dict]:
    options = BuildOptions(
        languages=["en", "de", "ja", "zh-hans"], relations=["P36", "P37"], num_wrong_objects=3
    )
    return build_mpararel(MPARAREL, options)


def test_mpararel_aligns_facts_across_languages_on_wikidata_ids(
    capitals: tuple[list[FactRecord], dict],
) -> None:
    records, manifest = capitals
    assert_well_formed(records)
    facts = by_fact(records)
    assert len(facts) > 100
    # --all_languages (default): every fact has every language.
    assert all(set(per_language) == {"en", "de", "ja", "zh-hans"} for per_language in facts.values())
    # The uuid carries relation, subject and object ids; the labels agree with the source's tuples.
    tuples = {
        language: {
            (data["sub_uri"], data["obj_uri"]): data
            for _line, data in iter_jsonl(MPARAREL / "tuples" / language / "P36.jsonl")
        }
        for language in ("en", "ja")
    }
    checked = 0
    for uuid, per_language in facts.items():
        relation, sub_uri, obj_uri = uuid.split(":")
        if relation != "P36":
            continue
        for language in ("en", "ja"):
            source = tuples[language][sub_uri, obj_uri]
            assert per_language[language].object == source["obj_label"]
            assert per_language[language].subject == source["sub_label"]
            checked += 1
    assert checked > 100
    assert manifest["source"] == "mpararel"


def test_mpararel_keeps_human_checked_patterns_where_the_language_was_reviewed(
    capitals: tuple[list[FactRecord], dict],
) -> None:
    records, manifest = capitals
    checked_de = {
        data["pattern"]
        for _line, data in iter_jsonl(MPARAREL / "patterns" / "de" / "P36.jsonl")
        if data["checked-by-human"]
    }
    unchecked_de = {
        data["pattern"]
        for _line, data in iter_jsonl(MPARAREL / "patterns" / "de" / "P36.jsonl")
        if not data["checked-by-human"]
    }
    german = next(record for record in records if record.language == "de" and record.relation == "P36")
    templates = {query.replace(german.subject, "[X]") for query in german.queries}
    assert templates <= checked_de
    assert not templates & unchecked_de
    assert len(templates) == len(checked_de)
    # ja was never reviewed: all its patterns are kept, and the manifest says so.
    assert manifest["report"]["per_language"]["ja"]["reviewed"] == 0
    assert any(note.startswith("ja: no pattern is checked-by-human") for note in manifest["report"]["notes"])
    assert manifest["report"]["per_language"]["de"]["patterns.dropped.not_human_checked"] > 0


def test_wrong_objects_are_the_same_facts_in_every_language(capitals: tuple[list[FactRecord], dict]) -> None:
    records, _manifest = capitals
    facts = by_fact(records)
    # A label can name several objects (two "Georgia"s), so map each label to the set of its object ids.
    object_ids: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for uuid, per_language in facts.items():
        relation, _sub, obj_uri = uuid.split(":")
        for language, record in per_language.items():
            object_ids[relation, language, record.object].add(obj_uri)
    for uuid, per_language in facts.items():
        relation, _sub, obj_uri = uuid.split(":")
        positions: list[set[str]] = [set() for _ in range(3)]
        for index, (language, record) in enumerate(per_language.items()):
            assert len(record.wrong_objects) == 3 and len(set(record.wrong_objects)) == 3
            for position, label in enumerate(record.wrong_objects):
                ids = object_ids[relation, language, label]
                assert ids, f"wrong object {label!r} is not the object of any {relation} fact in {language}"
                positions[position] = ids if index == 0 else positions[position] & ids
        # Same wrong facts (same object ids) in every language, in the same order; never the true object.
        assert all(positions), f"{uuid}: wrong objects differ across languages"
        assert all(obj_uri not in ids for ids in positions if len(ids) == 1)


def test_build_is_deterministic_and_seed_dependent() -> None:
    options = BuildOptions(languages=["en", "fr"], relations=["P36"], max_facts_per_relation=20, seed=5)
    first, _ = build_mpararel(MPARAREL, options)
    second, _ = build_mpararel(MPARAREL, options)
    assert first == second
    other, _ = build_mpararel(
        MPARAREL, BuildOptions(languages=["en", "fr"], relations=["P36"], max_facts_per_relation=20, seed=6)
    )
    assert {record.uuid for record in first} != {record.uuid for record in other}
    assert len({record.uuid for record in first}) == 20


def test_causal_drops_templates_with_slot_before_subject() -> None:
    options = BuildOptions(languages=["en"], relations=["P36"], model_kind="causal", max_facts_per_relation=5)
    records, manifest = build_mpararel(MPARAREL, options)
    for record in records:
        for query in record.queries:
            assert query.index("[Y]") > query.index(record.subject)
    assert manifest["report"]["counters"]["patterns.dropped.slot_before_subject"] > 0
    masked, _ = build_mpararel(
        MPARAREL, BuildOptions(languages=["en"], relations=["P36"], max_facts_per_relation=5)
    )
    assert sum(map(len, (r.queries for r in masked))) > sum(map(len, (r.queries for r in records)))


def test_all_patterns_and_unreviewed_skip_options() -> None:
    everything, _ = build_mpararel(
        MPARAREL,
        BuildOptions(languages=["de"], relations=["P36"], max_facts_per_relation=3),
        all_patterns=True,
    )
    assert len(everything[0].queries) == sum(
        1 for _ in iter_jsonl(MPARAREL / "patterns" / "de" / "P36.jsonl")
    )
    records, manifest = build_mpararel(
        MPARAREL,
        BuildOptions(languages=["de", "ja"], relations=["P36"], all_languages=False),
        unreviewed_languages="skip",
    )
    assert {record.language for record in records} == {"de"}
    assert {
        "language": "ja",
        "relation": "P36",
        "reason": "language has no human-checked pattern",
    } in manifest["report"]["skipped"]


def test_without_all_languages_facts_may_miss_languages() -> None:
    options = BuildOptions(languages=["en", "zh-hans"], relations=["P36"], all_languages=False)
    records, _ = build_mpararel(MPARAREL, options)
    languages_per_fact = [set(per_language) for per_language in by_fact(records).values()]
    assert {"en"} in languages_per_fact  # zh-hans has fewer tuples than en
    aligned, _ = build_mpararel(MPARAREL, BuildOptions(languages=["en", "zh-hans"], relations=["P36"]))
    assert len(by_fact(aligned)) < len(languages_per_fact)


def test_pararel_builds_english_records_with_its_uuids() -> None:
    records, manifest = build_pararel(
        PARAREL, BuildOptions(relations=["P36", "P103"], max_facts_per_relation=10)
    )
    assert_well_formed(records)
    assert {record.language for record in records} == {"en"}
    assert len(records) == 20
    source_uuids = {
        data["uuid"] for _line, data in iter_jsonl(PARAREL / "data" / "trex_lms_vocab" / "P36.jsonl")
    }
    assert {record.uuid for record in records if record.relation == "P36"} <= source_uuids
    assert all(len(record.queries) > 3 for record in records)
    assert manifest["source"] == "pararel" and manifest["languages"] == ["en"]


def make_mlama_tree(root: Path) -> Path:
    """Writes an mLAMA-layout folder from real mParaRel P36 data (two templates per language)."""
    for language in ("en", "ja"):
        folder = root / language
        folder.mkdir(parents=True)
        patterns = [
            data["pattern"] for _line, data in iter_jsonl(MPARAREL / "patterns" / language / "P36.jsonl")
        ]
        with open(folder / "templates.jsonl", "w", encoding="utf-8") as handle:
            for pattern in patterns[:2]:
                handle.write(
                    json.dumps({"relation": "P36", "template": pattern + " ."}, ensure_ascii=False) + "\n"
                )
        with open(folder / "P36.jsonl", "w", encoding="utf-8") as handle:
            for _line, data in list(iter_jsonl(MPARAREL / "tuples" / language / "P36.jsonl"))[:40]:
                fact = {
                    "sub_label": data["sub_label"],
                    "obj_label": data["obj_label"],
                    "uuid": f"mlama-{data['sub_uri']}-{data['obj_uri']}",
                }
                handle.write(json.dumps(fact, ensure_ascii=False) + "\n")
    return root


def test_mlama_layout_aligns_on_uuid(tmp_path: Path) -> None:
    root = make_mlama_tree(tmp_path / "mlama")
    records, _ = build_mlama(root, BuildOptions(num_wrong_objects=2))
    assert_well_formed(records)
    facts = by_fact(records)
    assert facts and all(set(per_language) == {"en", "ja"} for per_language in facts.values())
    templates = {
        language: [
            json.loads(line)["template"]
            for line in (root / language / "templates.jsonl").open(encoding="utf-8")
        ]
        for language in ("en", "ja")
    }
    for record in records:
        assert record.queries == [
            template.replace("[X]", record.subject) for template in templates[record.language]
        ]
    # Wrong objects are the same facts in both languages: map labels back to uuids through the records.
    uuid_of = {(record.language, record.object): record.uuid for record in records}
    for per_language in facts.values():
        wrong = {
            language: [uuid_of.get((language, label)) for label in record.wrong_objects]
            for language, record in per_language.items()
        }
        assert wrong["en"] == wrong["ja"] and len(wrong["en"]) == 2


def test_precursor_restores_slots_and_recovers_subjects() -> None:
    options = BuildOptions(languages=["en", "fr", "ja", "ko"], relations=["P36", "P1376"])
    records, manifest = build_rml_precursor(PRECURSOR, options, pararel_root=PARAREL, mpararel_root=MPARAREL)
    assert_well_formed(records)
    source = json.loads((PRECURSOR / "Aligned_my_MLAMA" / "ja.json").read_text(encoding="utf-8"))
    for record in records:
        if record.language == "ja":
            # Removing [Y] gives back a sentence of the source: the slot was put where the object was deleted.
            assert {query.replace("[Y]", "") for query in record.queries} <= set(
                source[record.uuid]["sentences"]
            )
            assert record.object == source[record.uuid]["obj_label"]
    counters = manifest["report"]["counters"]
    assert (
        counters["queries.repaired.japanese_particle"] > 0
        and counters["queries.repaired.korean_particle"] > 0
    )
    assert counters["queries.dropped.slot_not_found"] > 0
    recovered = [record for record in records if record.subject]
    assert len(recovered) > 0.6 * len(records)
    english = next(record for record in records if record.language == "en" and record.subject)
    assert all(query.startswith(english.subject) or english.subject in query for query in english.queries)


def test_precursor_without_subject_sources_leaves_subjects_empty_and_says_so() -> None:
    options = BuildOptions(
        languages=["en", "hu"], relations=["P101"], max_facts_per_relation=5, model_kind="causal"
    )
    records, manifest = build_rml_precursor(PRECURSOR, options)
    assert records and all(record.subject == "" for record in records)
    assert any("subjects not recovered" in note for note in manifest["report"]["notes"])
    # causal: only final punctuation after the slot.
    for record in records:
        for query in record.queries:
            assert query.split("[Y]", 1)[1].strip() in {"", ".", ","}
    assert manifest["report"]["counters"].get("queries.dropped.slot_not_final", 0) > 0


def test_command_line_writes_records_and_manifest(tmp_path: Path) -> None:
    output = tmp_path / "cli.jsonl"
    status = main(
        [
            "mpararel",
            "--root",
            str(MPARAREL),
            "--languages",
            "[en,ru]",
            "--relations",
            "[P36]",
            "--max_facts_per_relation",
            "4",
            "--num_wrong_objects",
            "2",
            "--output",
            str(output),
        ]
    )
    assert status == 0
    records = read_records(output)
    assert len(records) == 8 and all(len(record.wrong_objects) == 2 for record in records)
    manifest = read_manifest(output)
    assert manifest["options"]["languages"] == ["en", "ru"]
    assert manifest["counts"]["per_language"]["ru"]["facts"] == 4


def test_command_line_reports_bad_input_without_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    status = main(
        ["mpararel", "--root", str(MPARAREL), "--languages", "[xx]", "--output", str(tmp_path / "o.jsonl")]
    )
    assert status == 2
    assert "after --languages xx: no language left" in caplog.text


def test_fixture_is_reproduced_by_the_documented_command(tmp_path: Path) -> None:
    readme = (FIXTURE.parent / "README.md").read_text(encoding="utf-8")
    command = next(line.strip() for line in readme.splitlines() if "knlight data build mpararel" in line)
    arguments = command.split("knlight data build", 1)[1].split()
    arguments = [
        str(tmp_path / "again.jsonl") if arg == "tests/fixtures/rml_small.jsonl" else arg for arg in arguments
    ]
    arguments = [str(MPARAREL) if arg == "../shared/data/mpararel" else arg for arg in arguments]
    from knlight.cli import main as knlight_main

    knlight_main(["data", "build", *arguments])
    assert (tmp_path / "again.jsonl").read_text(encoding="utf-8") == FIXTURE.read_text(encoding="utf-8")


def _readme_number(text: str) -> int:
    return int(text.replace(",", ""))


def test_the_readme_mpararel_figures_are_what_the_build_gives() -> None:
    """The default mParaRel build quoted in the README (facts, relations, queries, per-language table, the
    causal variant) is recomputed from ../shared/data; README and data cannot drift apart."""
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    summary = re.search(
        r"([\d,]+) facts\s+present in all (\d+) languages, (\d+) relations, ([\d,]+) queries", readme
    )
    assert summary, "the README quotes the default mParaRel build"
    facts, n_languages, relations, queries = (_readme_number(g) for g in summary.groups())
    command = readme[readme.rindex("knlight data build mpararel", 0, summary.start()) : summary.start()]
    languages = re.search(r"--languages\s+([\w,-]+)", command)
    assert languages
    wanted = languages.group(1).split(",")
    table = {
        m.group(1): tuple(_readme_number(x) for x in m.groups()[1:])
        for m in re.finditer(r"^\| ([a-z-]+) \| [^|]+ \| (\d+) \| (\d+) \| (\d+) \|", readme, re.MULTILINE)
    }
    assert set(table) == set(wanted) and len(wanted) == n_languages

    records, manifest = build_mpararel(MPARAREL, BuildOptions(languages=wanted, model_kind="masked"))
    assert len({r.uuid for r in records}) == facts
    assert len({r.relation for r in records}) == relations
    assert sum(len(r.queries) for r in records) == queries
    per_language = manifest["report"]["per_language"]
    for language, (patterns, n_facts, n_queries) in table.items():
        mine = [r for r in records if r.language == language]
        assert (per_language[language]["patterns.kept"], len(mine), sum(len(r.queries) for r in mine)) == (
            patterns, n_facts, n_queries,
        ), language  # fmt: skip

    causal = re.search(r"--model_kind causal` \(slot after the subject\) (\d+) patterns are dropped: ([\d,]+) facts, "
                       r"([\d,]+) queries", readme)  # fmt: skip
    assert causal
    dropped, causal_facts, causal_queries = (_readme_number(g) for g in causal.groups())
    records, manifest = build_mpararel(MPARAREL, BuildOptions(languages=wanted, model_kind="causal"))
    assert len({r.uuid for r in records}) == causal_facts
    assert sum(len(r.queries) for r in records) == causal_queries
    kept = sum(v["patterns.kept"] for v in manifest["report"]["per_language"].values())
    assert sum(patterns for patterns, _, _ in table.values()) - kept == dropped
