"""Bad input gets a DataError that says what is wrong, where (file:line or option) and what to do."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from knlight.data import DataError
from knlight.data.build import build_mlama, build_mpararel, build_pararel, build_rml_precursor
from knlight.data.pipeline import BuildOptions
from knlight.data.precursor import restore_slot
from knlight.data.scripts import lacks_expected_script

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"real data not found at {SHARED_DATA} (expected ../shared/data)"
)

FRANCE = {"sub_uri": "Q142", "obj_uri": "Q90", "sub_label": "France", "obj_label": "Paris"}
GERMANY = {"sub_uri": "Q183", "obj_uri": "Q64", "sub_label": "Germany", "obj_label": "Berlin"}
ITALY = {"sub_uri": "Q38", "obj_uri": "Q220", "sub_label": "Italy", "obj_label": "Rome"}


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(
            (row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n" for row in rows
        ),
        encoding="utf-8",
    )
    return path


def mpararel_tree(
    root: Path, patterns: dict[str, dict[str, list]], tuples: dict[str, dict[str, list]]
) -> Path:
    """Writes a tiny mParaRel folder; a pattern is (text, checked) or a raw JSONL line (str)."""
    for language, by_relation in patterns.items():
        for relation, rows in by_relation.items():
            lines = [
                row if isinstance(row, str) else {"pattern": row[0], "checked-by-human": row[1]}
                for row in rows
            ]
            write_jsonl(root / "patterns" / language / f"{relation}.jsonl", lines)
    for language, by_relation in tuples.items():
        for relation, rows in by_relation.items():
            write_jsonl(root / "tuples" / language / f"{relation}.jsonl", rows)
    return root


def simple_tree(root: Path) -> Path:
    return mpararel_tree(
        root,
        {
            "en": {"P36": [("the capital of [X] is [Y]", False), ("[Y] is the capital of [X]", False)]},
            "ja": {"P36": [("[X]の首都は[Y]です", False)]},
        },
        {
            "en": {"P36": [FRANCE, GERMANY, ITALY]},
            "ja": {"P36": [{**FRANCE, "sub_label": "フランス", "obj_label": "パリ"}]},
        },
    )


# --- folders and files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda root: build_mpararel(root, BuildOptions()),
            r"mParaRel root .*nowhere does not exist; expected",
        ),
        (
            lambda root: build_pararel(root, BuildOptions()),
            r"ParaRel root .*nowhere does not exist; expected",
        ),
        (lambda root: build_mlama(root, BuildOptions()), r"mLAMA root .*nowhere does not exist; expected"),
        (
            lambda root: build_rml_precursor(root, BuildOptions()),
            r"RML-LAMA precursor root .*nowhere does not exist; expected .*Aligned_my_MLAMA",
        ),
    ],
)
def test_missing_source_folder_is_named_with_expected_layout(tmp_path: Path, build, message: str) -> None:
    with pytest.raises(DataError, match=message):
        build(tmp_path / "nowhere")


def test_missing_subfolder_is_named(tmp_path: Path) -> None:
    (tmp_path / "mp" / "patterns").mkdir(parents=True)
    with pytest.raises(
        DataError,
        match=r"mParaRel tuples folder .*mp/tuples does not exist; expected the layout <root>/patterns",
    ):
        build_mpararel(tmp_path / "mp", BuildOptions())


def test_mlama_language_without_templates_file_is_named(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "ml" / "en" / "templates.jsonl", [{"relation": "P36", "template": "[X] has [Y] ."}]
    )
    write_jsonl(
        tmp_path / "ml" / "en" / "P36.jsonl", [{"sub_label": "France", "obj_label": "Paris", "uuid": "u1"}]
    )
    (tmp_path / "ml" / "fr").mkdir()
    with pytest.raises(DataError, match=r"templates file .*ml/fr/templates\.jsonl does not exist"):
        build_mlama(tmp_path / "ml", BuildOptions(languages=["en", "fr"]))


def test_precursor_subject_source_without_expected_files_is_named(tmp_path: Path) -> None:
    precursor = tmp_path / "pre" / "Aligned_my_MLAMA"
    precursor.mkdir(parents=True)
    (precursor / "en.json").write_text(
        json.dumps(
            {"u1": {"sentences": ["France's capital is ."], "relation_name": "P36", "obj_label": "Paris"}}
        ),
        encoding="utf-8",
    )
    with pytest.raises(DataError, match=r"ParaRel facts folder \(--pararel_root\) .*does not exist"):
        build_rml_precursor(tmp_path / "pre", BuildOptions(), pararel_root=tmp_path / "empty")


# --- malformed lines ------------------------------------------------------------------------------


def test_malformed_tuple_line_names_file_and_line(tmp_path: Path) -> None:
    root = simple_tree(tmp_path / "mp")
    write_jsonl(root / "tuples" / "en" / "P36.jsonl", [FRANCE, '{"sub_uri": "Q183", "obj_uri": '])
    with pytest.raises(DataError, match=r"tuples/en/P36\.jsonl:2: malformed JSON line \(Expecting value"):
        build_mpararel(root, BuildOptions(languages=["en"]))


def test_tuple_line_missing_a_field_names_file_line_and_field(tmp_path: Path) -> None:
    root = simple_tree(tmp_path / "mp")
    write_jsonl(root / "tuples" / "en" / "P36.jsonl", [FRANCE, {"sub_uri": "Q183", "sub_label": "Germany"}])
    with pytest.raises(DataError, match=r"tuples/en/P36\.jsonl:2: missing or empty 'obj_uri'"):
        build_mpararel(root, BuildOptions(languages=["en"]))


def test_malformed_pattern_line_names_file_and_line(tmp_path: Path) -> None:
    root = simple_tree(tmp_path / "mp")
    write_jsonl(root / "patterns" / "en" / "P36.jsonl", [{"pattern": "[X] has [Y]"}, "{not json"])
    with pytest.raises(DataError, match=r"patterns/en/P36\.jsonl:2: malformed JSON line"):
        build_mpararel(root, BuildOptions(languages=["en"]))


def test_precursor_malformed_entry_names_file_and_uuid(tmp_path: Path) -> None:
    folder = tmp_path / "pre" / "Aligned_my_MLAMA"
    folder.mkdir(parents=True)
    (folder / "en.json").write_text(json.dumps({"u1": {"sentences": "oops", "relation_name": "P36"}}))
    with pytest.raises(DataError, match=r"en\.json: entry 'u1': 'sentences' must be a list"):
        build_rml_precursor(tmp_path / "pre", BuildOptions())
    (folder / "en.json").write_text('{"u1": {"sentences": [}')
    with pytest.raises(DataError, match=r"en\.json:1: malformed JSON"):
        build_rml_precursor(tmp_path / "pre", BuildOptions())


# --- patterns without slots -----------------------------------------------------------------------


def test_pattern_without_slot_is_skipped_and_counted(tmp_path: Path) -> None:
    root = simple_tree(tmp_path / "mp")
    write_jsonl(
        root / "patterns" / "en" / "P36.jsonl",
        [
            {"pattern": "the capital of [X] is [Y]"},
            {"pattern": "the capital of [X] is Paris"},
            {"pattern": "[Y] [Y]"},
        ],
    )
    records, manifest = build_mpararel(root, BuildOptions(languages=["en"]))
    assert all(len(record.queries) == 1 for record in records)
    report = manifest["report"]
    assert report["counters"]["warnings.invalid_pattern"] == 2
    assert report["per_language"]["en"]["patterns.invalid"] == 2
    assert re.search(
        r"patterns/en/P36\.jsonl:2: skipped pattern: \[Y\] appears 0 times",
        report["warnings"]["invalid_pattern"][0],
    )
    assert "P36.jsonl:3" in report["warnings"]["invalid_pattern"][1]


def test_file_where_every_pattern_lacks_a_slot_is_an_error(tmp_path: Path) -> None:
    root = simple_tree(tmp_path / "mp")
    write_jsonl(
        root / "patterns" / "en" / "P36.jsonl", [{"pattern": "capital of X is Y"}, {"pattern": "[X] is"}]
    )
    with pytest.raises(
        DataError, match=r"patterns/en/P36\.jsonl: every pattern \(2\) lacks a single \[X\] or \[Y\]"
    ):
        build_mpararel(root, BuildOptions(languages=["en"]))


def test_mlama_templates_without_slots_are_an_error(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "ml" / "en" / "templates.jsonl", [{"relation": "P36", "template": "no slots"}])
    write_jsonl(
        tmp_path / "ml" / "en" / "P36.jsonl", [{"sub_label": "France", "obj_label": "Paris", "uuid": "u1"}]
    )
    with pytest.raises(DataError, match=r"en/templates\.jsonl: every template lacks a single \[X\] or \[Y\]"):
        build_mlama(tmp_path / "ml", BuildOptions())


# --- selections -----------------------------------------------------------------------------------


def test_unknown_language_lists_the_available_ones(tmp_path: Path) -> None:
    root = simple_tree(tmp_path / "mp")
    with pytest.raises(
        DataError, match=r"after --languages xx: no language left; mParaRel at .* has: en, ja\."
    ):
        build_mpararel(root, BuildOptions(languages=["xx"]))
    with pytest.raises(
        DataError, match=r"--languages: unknown language\(s\) xx for mParaRel .*; available: en, ja"
    ):
        build_mpararel(root, BuildOptions(languages=["en", "xx"]))


def test_pararel_is_english_only(tmp_path: Path) -> None:
    write_jsonl(
        tmp_path / "pr" / "data" / "pattern_data" / "graphs_json" / "P36.jsonl", [{"pattern": "[X] [Y]"}]
    )
    write_jsonl(
        tmp_path / "pr" / "data" / "trex_lms_vocab" / "P36.jsonl",
        [{"sub_label": "a", "obj_label": "b", "uuid": "u"}],
    )
    with pytest.raises(
        DataError, match=r"after --languages fr: no language left; ParaRel .*\(English only\) has: en"
    ):
        build_pararel(tmp_path / "pr", BuildOptions(languages=["fr"]))


def test_unknown_relation_names_the_filter_and_lists_relations(tmp_path: Path) -> None:
    root = simple_tree(tmp_path / "mp")
    with pytest.raises(
        DataError, match=r"after --relations P999: no relation left; mParaRel at .* has: P36\."
    ):
        build_mpararel(root, BuildOptions(relations=["P999"]))


@needs_shared_data
def test_unknown_relation_on_real_data_lists_real_relations() -> None:
    with pytest.raises(DataError, match=r"after --relations P999: no relation left; .* has: P17, P19, P20, "):
        build_mpararel(SHARED_DATA / "mpararel", BuildOptions(languages=["en"], relations=["P999"]))


def test_no_common_fact_across_languages_names_the_filter(tmp_path: Path) -> None:
    root = simple_tree(tmp_path / "mp")
    write_jsonl(
        root / "tuples" / "ja" / "P36.jsonl",
        [{**ITALY, "sub_label": "イタリア", "obj_label": "ローマ", "obj_uri": "Q9"}],
    )
    with pytest.raises(
        DataError, match=r"after --all_languages true: no fact is present in every language .*en 3, ja 1"
    ):
        build_mpararel(root, BuildOptions(languages=["en", "ja"]))
    records, _ = build_mpararel(root, BuildOptions(languages=["en", "ja"], all_languages=False))
    assert len(records) == 4


def test_human_checked_filter_that_empties_the_selection_is_named(tmp_path: Path) -> None:
    root = mpararel_tree(
        tmp_path / "mp",
        {"de": {"P36": [("die hauptstadt von [X] ist [Y]", False)], "P37": [("[X] spricht [Y]", True)]}},
        {"de": {"P36": [FRANCE], "P37": [FRANCE]}},
    )
    with pytest.raises(
        DataError,
        match=r"after the filters: no human-checked pattern \(pass --all_patterns true to keep all\)",
    ):
        build_mpararel(root, BuildOptions(relations=["P36"]))
    records, _manifest = build_mpararel(root, BuildOptions(relations=["P36"]), all_patterns=True)
    assert records[0].queries == ["die hauptstadt von France ist [Y]"]


def test_causal_filter_that_empties_the_selection_is_named(tmp_path: Path) -> None:
    root = mpararel_tree(
        tmp_path / "mp", {"en": {"P36": [("[Y] is the capital of [X]", False)]}}, {"en": {"P36": [FRANCE]}}
    )
    with pytest.raises(DataError, match=r"no pattern with \[Y\] after \[X\] \(--model_kind causal\)"):
        build_mpararel(root, BuildOptions(model_kind="causal"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"model_kind": "encoder"}, r"--model_kind 'encoder': choose one of masked, causal"),
        ({"max_facts_per_relation": 0}, r"--max_facts_per_relation 0: give a positive number"),
        ({"num_wrong_objects": -1}, r"--num_wrong_objects -1: give 0 or a positive number"),
        ({"languages": []}, r"--languages is an empty list"),
    ],
)
def test_bad_options_are_named(options: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        BuildOptions(**options)


def test_bad_unreviewed_option_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"--unreviewed_languages 'drop': choose keep or skip"):
        build_mpararel(simple_tree(tmp_path / "mp"), BuildOptions(), unreviewed_languages="drop")


# --- scripts --------------------------------------------------------------------------------------


def latin_japanese_tree(root: Path) -> Path:
    return mpararel_tree(
        root,
        {
            "ja": {"P36": [("the capital of [X] is [Y]", False)]},
            "en": {"P36": [("the capital of [X] is [Y]", False)]},
        },
        {
            "ja": {"P36": [{**FRANCE, "sub_label": "フランス", "obj_label": "パリ"}]},
            "en": {"P36": [FRANCE]},
        },
    )


def test_language_without_its_script_is_a_counted_warning(tmp_path: Path) -> None:
    records, manifest = build_mpararel(latin_japanese_tree(tmp_path / "mp"), BuildOptions())
    assert len(records) == 2  # kept: it is a warning
    report = manifest["report"]
    assert report["counters"]["records.unexpected_script"] == 1
    assert report["per_language"]["ja"]["records.unexpected_script"] == 1
    assert (
        "patterns/ja/P36.jsonl: fact P36:Q142:Q90 in language 'ja' has no letter"
        in report["warnings"]["unexpected_script"][0]
    )


def test_language_without_its_script_is_an_error_with_strict_scripts(tmp_path: Path) -> None:
    with pytest.raises(
        DataError, match=r"patterns/ja/P36\.jsonl: fact P36:Q142:Q90 in language 'ja' .*--strict_scripts"
    ):
        build_mpararel(latin_japanese_tree(tmp_path / "mp"), BuildOptions(strict_scripts=True))


def test_script_heuristic() -> None:
    assert lacks_expected_script("ja", ["the capital of  is  "])
    assert not lacks_expected_script("ja", ["Xbox Oneは が作成しました"])  # a Latin name inside Japanese text
    assert lacks_expected_script("ru", ["capital"])
    assert not lacks_expected_script("ru", ["столица"])
    assert not lacks_expected_script("en", ["  ,  "])  # no letters: no evidence either way
    assert not lacks_expected_script("xx", ["anything"])  # unknown language: not checked


# --- precursor slot repair ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sentence", "language", "expected", "rule"),
    [
        ("Jamie Cullum plays .", "en", "Jamie Cullum plays [Y].", "end_before_punctuation"),
        ("The capital of Stirling is  .", "en", "The capital of Stirling is [Y].", "end_before_punctuation"),
        (
            "Israel, which has diplomatic relations with",
            "en",
            "Israel, which has diplomatic relations with [Y]",
            "end_of_sentence",
        ),
        (
            "Sapsan, a product created by ,",
            "en",
            "Sapsan, a product created by [Y],",
            "end_before_punctuation",
        ),
        ("Leicestershire  nevét viseli.", "hu", "Leicestershire [Y] nevét viseli.", "double_space"),
        ("Jamie Cullum -t játszik.", "hu", "Jamie Cullum [Y]-t játszik.", "case_suffix"),
        ("Jamie Cullum soittaa :tä.", "fi", "Jamie Cullum soittaa [Y]:tä.", "case_suffix"),
        ("제이미 컬럼는 를 연주합니다.", "ko", "제이미 컬럼는 [Y]를 연주합니다.", "korean_particle"),
        ("리브레오피스의 언어는 였습니다.", "ko", "리브레오피스의 언어는 [Y]였습니다.", "korean_particle"),
        (
            "ジェイミー・カラムはを演奏します。",
            "ja",
            "ジェイミー・カラムは[Y]を演奏します。",
            "japanese_particle",
        ),
        (
            "トミー・ドーシーのレーベル: 。",
            "ja",
            "トミー・ドーシーのレーベル: [Y]。",
            "end_before_punctuation",
        ),
    ],
)
def test_precursor_slot_is_restored_where_the_object_was_deleted(
    sentence: str, language: str, expected: str, rule: str
) -> None:
    assert restore_slot(sentence, language) == (expected, rule)


@pytest.mark.parametrize(
    ("sentence", "language", "reason"),
    [
        ("pontoon bridge,  a type of .", "en", "slot_ambiguous"),  # ParaRel's double space + final gap
        ("セルビア王国は首都を持つ国家です。", "ja", "slot_not_found"),  # は not followed by a case particle
        (
            "미겔 이달고 이 코스티야는 의 시민입니다.",
            "ko",
            "slot_ambiguous",
        ),  # particle-like word in the name
        ("A complete sentence.", "en", "slot_not_found"),
    ],
)
def test_precursor_sentence_without_a_unique_gap_is_dropped(
    sentence: str, language: str, reason: str
) -> None:
    assert restore_slot(sentence, language) == (None, reason)
