"""The pure fact-checking core without a Trainer: relation-set search, thresholds, result files."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from conftest import FIXTURE, REPO

from knlight import load_lm
from knlight.cli import main
from knlight.factcheck.claims import FALSE_CLAIM, TRUE_CLAIM, Claim
from knlight.factcheck.detectors import COLUMN, FEATURES, flagged
from knlight.factcheck.readouts import encode_claim
from knlight.factcheck.relation_sets import DKNSearch, dkn_rows, search_relation_sets
from knlight.factcheck.results import SplitResults, write_split
from knlight.metrics.factcheck import choose_threshold, complete_thresholds
from knlight.neurons.ig import IGOptions
from knlight.tasks.factcheck_data import FactCheckDataModule

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = REPO / "configs" / "tiny" / "factcheck.yaml"
SEARCH = DKNSearch(ig=IGOptions(steps=4))  # the tiny config's settings


def tiny_claims() -> FactCheckDataModule:
    data = FactCheckDataModule(str(FIXTURE), split_fractions=(0.5, 0.25, 0.25), seed=5, model_kind="causal",
                               queries_per_fact=1, max_wrong=2)  # fmt: skip
    data.setup("test")
    return data


def test_the_search_without_a_trainer_gives_the_sets_of_a_test_run(tmp_path: Path) -> None:
    main(["test", "--config", str(CONFIG), "--data.init_args.path", str(FIXTURE), "--model.init_args.detectors",
          "[fast]", "--trainer.logger.init_args.save_dir", str(tmp_path)])  # fmt: skip
    (document,) = tmp_path.glob("tiny-factcheck/version_*/factcheck/test/results.json")
    from_run = json.loads(document.read_text("utf-8"))["relation_sets"]
    data = tiny_claims()
    relations = sorted({c.relation for c in data.claims("all")})
    sets = search_relation_sets(load_lm("tiny:gpt2"), data.claims("train"), relations, SEARCH)
    assert [s.to_json() for s in sets.values()] == from_run
    assert all(s.neurons for s in sets.values()) and {s.relation for s in sets.values()} == {"P36", "P37"}


def test_sharded_search_equals_the_single_process_search() -> None:
    """Two shards searched apart and their rows gathered give the sets of one process searching everything."""
    lm = load_lm("tiny:gpt2")
    data = tiny_claims()
    train = data.claims("train")
    relations = sorted({c.relation for c in data.claims("all")})
    true_claims = [c for c in train if c.label == TRUE_CLAIM]
    assert len(true_claims) >= 2
    other = [row for c in true_claims[1::2] for row in dkn_rows(lm, c.claim_id, encode_claim(lm, c), SEARCH)]

    def gather(rows: torch.Tensor) -> torch.Tensor:  # the other "process" comes first: order must not matter
        return torch.cat([torch.tensor(other, dtype=torch.long).reshape(-1, 5), rows])

    searched: list[Claim] = []

    def shard(claims: Sequence[Claim]) -> list[Claim]:
        searched.extend(claims[0::2])
        return list(claims[0::2])

    sharded = search_relation_sets(lm, train, relations, SEARCH, shard=shard, gather=gather)
    single = search_relation_sets(lm, train, relations, SEARCH)
    assert searched == true_claims[0::2]
    assert [s.to_json() for s in sharded.values()] == [s.to_json() for s in single.values()]


def test_thresholds_are_completed_in_detector_order_and_given_ones_kept() -> None:
    labels = torch.tensor([TRUE_CLAIM, FALSE_CLAIM, FALSE_CLAIM, TRUE_CLAIM])
    scores = {"prob": torch.tensor([1.0, 3.0, 4.0, 2.0]), "rank": torch.tensor([5.0, 1.0, 9.0, 2.0])}
    given, source = {"rank": 7.0}, {"rank": "given"}
    chosen, where = complete_thresholds(given, source, scores, labels, "val")
    assert chosen == {"rank": 7.0, "prob": choose_threshold(scores["prob"], labels)} and chosen["prob"] == 2.5
    assert list(chosen) == ["rank", "prob"] and where == {"rank": "given", "prob": "val"}
    assert given == {"rank": 7.0}  # the inputs are not changed


def test_write_split_writes_the_three_files(tmp_path: Path) -> None:
    claims = [Claim(k, "U1", "P36", "en", 0, "x [Y]", c, label, k) for k, (c, label) in
              enumerate([("Paris", TRUE_CLAIM), ("Rome", FALSE_CLAIM), ("Oslo", FALSE_CLAIM)])]  # fmt: skip
    labels = torch.tensor([c.label for c in claims])
    features = torch.full((3, len(FEATURES)), math.nan, dtype=torch.float64)
    features[:, COLUMN["log_prob"]] = torch.tensor([-1.0, -2.0, -4.0], dtype=torch.float64)
    scores = {"prob": -features[:, COLUMN["log_prob"]]}
    table = [{"split": "test", "detector": "prob", "f1": math.nan, "n": 3}]
    results = SplitResults(
        "test", claims, labels, features, scores, {"prob": 3.0}, {"prob": "given"}, table, 4, 2
    )
    write_split(tmp_path, results, {"model": "tiny:gpt2"}, [], {})
    document = json.loads((tmp_path / "results.json").read_text("utf-8"))
    assert list(document)[:3] == ["settings", "split", "positive_class"] and document["settings"]["model"]
    assert document["counts"]["rows_received"] == 4 and document["counts"]["world_size"] == 2
    assert document["table"][0]["f1"] is None  # NaN written as null
    assert document["reference"]["false_share"] == pytest.approx(2 / 3)
    assert (tmp_path / "results.csv").read_text("utf-8") == "split,detector,f1,n\ntest,prob,nan,3\n"
    with (tmp_path / "claims.csv").open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["flagged_prob"]) for r in rows] == flagged(scores["prob"], 3.0).tolist() == [0, 0, 1]
    assert [r["candidate"] for r in rows] == ["Paris", "Rome", "Oslo"] and rows[0]["amig"] == "nan"
