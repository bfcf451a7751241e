"""The record format: validation, atomic writing, manifests, and reading back through ``datasets``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knlight.data import DataError, FactRecord, read_manifest, read_records, write_records
from knlight.data.records import manifest_path_for, validate_records_file

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "rml_small.jsonl"


def make_record(uuid: str = "P36:Q142:Q90", language: str = "fr", **changes: object) -> FactRecord:
    fields: dict = {
        "uuid": uuid,
        "relation": "P36",
        "language": language,
        "subject": "France",
        "object": "Paris",
        "queries": ["La capitale de France est [Y].", "[Y] est la capitale de France."],
        "wrong_objects": ["Berlin", "Rome"],
    }
    fields.update(changes)
    return FactRecord(**fields)


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_write_then_read_round_trips_records_and_manifest(tmp_path: Path) -> None:
    records = [
        make_record(),
        make_record(
            language="de",
            subject="Frankreich",
            object="Paris",
            queries=["Die Hauptstadt von Frankreich ist [Y]."],
        ),
        make_record(uuid="P36:Q183:Q64", wrong_objects=[]),
    ]
    output = tmp_path / "out" / "facts.jsonl"
    manifest_path = write_records(output, records, {"source": "unit test"})

    assert manifest_path == tmp_path / "out" / "facts.manifest.json"
    assert read_records(output) == records
    manifest = read_manifest(output)
    assert manifest["source"] == "unit test"
    assert manifest["counts"]["facts"] == 2
    assert manifest["counts"]["records"] == 3
    assert manifest["counts"]["queries"] == 5
    assert manifest["counts"]["per_language"] == {
        "de": {"facts": 1, "queries": 1},
        "fr": {"facts": 2, "queries": 4},
    }
    assert manifest["counts"]["per_relation"] == {"P36": {"facts": 2, "queries": 5}}
    # Atomic writing leaves no temporary file behind.
    assert sorted(path.name for path in output.parent.iterdir()) == ["facts.jsonl", "facts.manifest.json"]


def test_records_without_wrong_objects_key_read_as_empty_list(tmp_path: Path) -> None:
    data = make_record().to_dict()
    del data["wrong_objects"]
    path = write_lines(tmp_path / "r.jsonl", [json.dumps(data)])
    assert read_records(path)[0].wrong_objects == []


def test_fixture_is_valid_and_small() -> None:
    records = read_records(FIXTURE)
    assert FIXTURE.stat().st_size < 10_000
    assert {record.language for record in records} >= {"en", "de", "zh-hans"}
    assert all(len(record.queries) >= 2 and record.wrong_objects for record in records)
    assert read_manifest(FIXTURE)["source"] == "mpararel"


def test_manifest_path_sits_beside_records() -> None:
    assert manifest_path_for("a/b/rml.jsonl") == Path("a/b/rml.manifest.json")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"uuid": "u", "relation": "P36"', r"bad\.jsonl:2: malformed JSON line"),
        ("[1, 2]", r"bad\.jsonl:2: expected a JSON object"),
        ('{"uuid": "u"}', r"bad\.jsonl:2: missing key\(s\) relation, language"),
    ],
)
def test_malformed_line_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(make_record().to_dict()), line])
    with pytest.raises(DataError, match=message):
        read_records(path)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"queries": ["La capitale de France est Paris."]},
            r"queries\[0\] must contain the object slot \[Y\] exactly once, found 0",
        ),
        (
            {"queries": ["[Y] et [Y]"]},
            r"queries\[0\] must contain the object slot \[Y\] exactly once, found 2",
        ),
        ({"queries": ["La capitale de [X] est [Y]."]}, r"queries\[0\] still contains the subject slot \[X\]"),
        ({"queries": []}, r"'queries' must be a non-empty list"),
        ({"wrong_objects": ["Paris"]}, r"'wrong_objects' contains the true object 'Paris'"),
        ({"object": ""}, r"'object' is empty"),
        ({"language": 3}, r"'language' must be a string"),
        ({"extra": 1}, r"unknown key\(s\) extra"),
    ],
)
def test_invalid_record_fields_are_rejected_with_line(tmp_path: Path, changes: dict, message: str) -> None:
    data = {**make_record().to_dict(), **changes}
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps(data)])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: " + message):
        validate_records_file(path)


def test_duplicate_fact_language_pair_is_rejected(tmp_path: Path) -> None:
    line = json.dumps(make_record().to_dict())
    path = write_lines(tmp_path / "dup.jsonl", [line, line])
    with pytest.raises(DataError, match=r"dup\.jsonl:2: duplicate record .* \(first at line 1\)"):
        read_records(path)


def test_one_uuid_with_two_relations_is_rejected(tmp_path: Path) -> None:
    lines = [
        json.dumps(make_record().to_dict()),
        json.dumps(make_record(language="de", relation="P37").to_dict()),
    ]
    path = write_lines(tmp_path / "rel.jsonl", lines)
    with pytest.raises(DataError, match=r"rel\.jsonl:2: .*has relation 'P37' but 'P36' at line 1"):
        read_records(path)


def test_missing_and_empty_files_say_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"records file .*nope\.jsonl does not exist.*knlight\.data\.build"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        read_records(write_lines(tmp_path / "empty.jsonl", []))
    with pytest.raises(DataError, match=r"manifest .*missing\.manifest\.json does not exist"):
        read_manifest(tmp_path / "missing.jsonl")


def test_write_rejects_invalid_records_before_touching_the_file(tmp_path: Path) -> None:
    output = tmp_path / "facts.jsonl"
    with pytest.raises(DataError, match=r"record #1 .*queries\[0\] must contain the object slot"):
        write_records(output, [make_record(), make_record(language="de", queries=["no slot"])], {})
    with pytest.raises(DataError, match=r"record #1: duplicate \(uuid, language\)"):
        write_records(output, [make_record(), make_record()], {})
    assert not output.exists()
