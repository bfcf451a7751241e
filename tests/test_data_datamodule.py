"""RMLLamaDataModule: items, batches, splits by fact, filters, and a LightningCLI round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from knlight.data import DataError, FactRecord, read_records, write_records
from knlight.data.datamodule import RMLLamaDataModule, collate_items

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "rml_small.jsonl"
ITEM_KEYS = {"uuid", "language", "relation", "query_id", "query", "answer", "subject"}


def planted_file(tmp_path: Path, facts: int = 40) -> Path:
    """A generated records file in the same format (like a planted-knowledge file)."""
    records = [
        FactRecord(
            uuid=f"fact-{index:03d}",
            relation="P1" if index % 2 else "P2",
            language=language,
            subject=f"s{index}{language}",
            object=f"o{index}{language}",
            queries=[f"s{index}{language} relates to [Y]", f"[Y] is related to s{index}{language}"],
            wrong_objects=[f"o{(index + 1) % facts}{language}"],
        )
        for index in range(facts)
        for language in ("aa", "bb")
    ]
    path = tmp_path / "planted.jsonl"
    write_records(path, records, {"source": "generated"})
    return path


def test_predict_batches_are_lists_of_items_in_sorted_order() -> None:
    datamodule = RMLLamaDataModule(str(FIXTURE), batch_size=5)
    datamodule.setup("predict")
    batches = list(datamodule.predict_dataloader())
    items = [item for batch in batches for item in batch]
    records = read_records(FIXTURE)
    assert len(items) == sum(len(record.queries) for record in records)
    assert all(isinstance(batch, list) and len(batch) <= 5 for batch in batches)
    assert all(set(item) == ITEM_KEYS for item in items)
    keys = [(item["uuid"], item["language"], item["query_id"]) for item in items]
    assert keys == sorted(keys)
    by_key = {(record.uuid, record.language): record for record in records}
    for item in items:
        record = by_key[item["uuid"], item["language"]]
        assert item["query"] == record.queries[item["query_id"]]
        assert item["answer"] == record.object and item["subject"] == record.subject
        assert item["relation"] == record.relation


def test_collate_returns_items_unchanged() -> None:
    items = [{"uuid": "u", "query": "a [Y]"}, {"uuid": "v", "query": "b [Y]"}]
    assert collate_items(items) == items


def test_splits_partition_facts_and_keep_languages_together(tmp_path: Path) -> None:
    datamodule = RMLLamaDataModule(
        str(planted_file(tmp_path)), split_fractions=(0.5, 0.25, 0.25), batch_size=4
    )
    datamodule.setup("fit")
    uuids = {}
    for split, loader in (
        ("train", datamodule.train_dataloader()),
        ("val", datamodule.val_dataloader()),
        ("test", datamodule.test_dataloader()),
    ):
        items = [item for batch in loader for item in batch]
        uuids[split] = {item["uuid"] for item in items}
        assert uuids[split], f"{split} is empty"
        for uuid in uuids[split]:
            assert {item["language"] for item in items if item["uuid"] == uuid} == {"aa", "bb"}
    assert not (
        uuids["train"] & uuids["val"] or uuids["train"] & uuids["test"] or uuids["val"] & uuids["test"]
    )
    assert len(uuids["train"] | uuids["val"] | uuids["test"]) == 40
    # The same arguments give the same splits.
    again = RMLLamaDataModule(str(planted_file(tmp_path)), split_fractions=(0.5, 0.25, 0.25))
    assert {item["uuid"] for item in again.items("test")} == uuids["test"]


def test_training_order_is_shuffled_but_reproducible(tmp_path: Path) -> None:
    path = str(planted_file(tmp_path))
    first = [item["uuid"] for batch in RMLLamaDataModule(path, seed=1).train_dataloader() for item in batch]
    second = [item["uuid"] for batch in RMLLamaDataModule(path, seed=1).train_dataloader() for item in batch]
    assert first == second
    assert first != sorted(first)


def test_filters_select_languages_relations_and_facts(tmp_path: Path) -> None:
    path = str(planted_file(tmp_path))
    datamodule = RMLLamaDataModule(path, languages=["bb"], relations=["P1"], max_facts=5)
    records = datamodule.records()
    assert {record.language for record in records} == {"bb"}
    assert {record.relation for record in records} == {"P1"}
    assert len({record.uuid for record in records}) == 5
    assert all(record.wrong_objects for record in records)
    assert {item["uuid"] for item in datamodule.items()} == {record.uuid for record in records}


def test_causal_drops_queries_starting_with_the_slot_and_keeps_query_ids(tmp_path: Path) -> None:
    datamodule = RMLLamaDataModule(str(planted_file(tmp_path)), model_kind="causal")
    items = datamodule.items()
    assert items and all(not item["query"].startswith("[Y]") for item in items)
    assert {item["query_id"] for item in items} == {0}
    assert len(RMLLamaDataModule(str(planted_file(tmp_path))).items()) == 2 * len(items)


def test_every_query_starting_with_slot_is_an_error_under_causal(tmp_path: Path) -> None:
    path = tmp_path / "slot_first.jsonl"
    write_records(path, [FactRecord("u", "P1", "en", "s", "o", ["[Y] is s"])], {})
    with pytest.raises(DataError, match=r"slot_first\.jsonl: no query left after model_kind='causal'"):
        RMLLamaDataModule(str(path), model_kind="causal").setup()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (
            {"languages": ["xx"]},
            r"languages=\['xx'\]: xx not in .*rml_small\.jsonl; available: de, en, zh-hans",
        ),
        ({"relations": ["P999"]}, r"relations=\['P999'\]: P999 not in .*; available: P36, P37"),
    ],
)
def test_unknown_selection_names_the_argument(arguments: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        RMLLamaDataModule(str(FIXTURE), **arguments).setup()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"model_kind": "encoder"}, r"model_kind='encoder': choose None, 'masked' or 'causal'"),
        ({"max_facts": 0}, r"max_facts=0: give a positive number"),
        ({"batch_size": 0}, r"batch_size=0: give a positive number"),
        ({"split_fractions": (0.5, 0.6, 0.1)}, r"split fractions .*summing to 1"),
    ],
)
def test_bad_arguments_are_named(arguments: dict, message: str) -> None:
    with pytest.raises(DataError, match=message):
        RMLLamaDataModule(str(FIXTURE), **arguments).setup()


def test_missing_records_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"records file .*absent\.jsonl does not exist"):
        RMLLamaDataModule(str(tmp_path / "absent.jsonl")).setup()


def test_lightning_cli_parses_documented_arguments(tmp_path: Path) -> None:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(RMLLamaDataModule, "data")
    help_text = parser.format_help()
    assert "Keep only these language codes" in help_text and "Items per batch" in help_text
    config = parser.parse_args(
        [
            "--data.path",
            str(FIXTURE),
            "--data.languages",
            "[en,de]",
            "--data.split_fractions",
            "[0.6,0.2,0.2]",
        ]
    )
    datamodule = RMLLamaDataModule(**config.data.as_dict())
    assert {item["language"] for item in datamodule.items()} == {"en", "de"}
    assert json.loads(json.dumps(datamodule.hparams["split_fractions"])) == [0.6, 0.2, 0.2]
