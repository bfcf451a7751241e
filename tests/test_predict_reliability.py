"""`knlight predict` and `python -m knlight.select` on bad folders and faults, tried as a user would.

Each test makes the bad input with the real command line (in-process, or as real processes), asserts the
clear error (which folder, file or line, what to do) and that nothing already written is lost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import FIXTURE

from knlight import load_lm
from knlight.cli import main
from knlight.data.datamodule import RMLLamaDataModule
from knlight.errors import DataError
from knlight.lm.options import LMOptions
from knlight.neurons.ig import IGOptions
from knlight.runfolder import RunFolderError
from knlight.select import main as select_main  # the python -m alias
from knlight.selection import SelectionError, UncertaintyOptions, run_selection
from knlight.tasks import AttributionModule
from knlight.tasks.attribution import input_hash

pytestmark = pytest.mark.usefixtures("one_thread")

OUT = Path("runs", "tiny-localize", "attributions")
MORE = ["--data.init_args.max_facts", "2", "--data.init_args.batch_size", "2"]  # 28 items, 14 batches
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
SCORES = ["--model.init_args.return_scores", "true", "--trainer.callbacks.init_args.save_scores", "true"]
ZH = ["--data.init_args.languages", "[zh-hans]"]  # 2 items


def knlight_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "knlight", *args]


def snapshot(folder: Path, with_lock: bool = False) -> dict[str, bytes]:
    """Every file under ``folder`` (by relative path) with its bytes; the lock's holder note only if asked."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and (with_lock or p.name != ".lock")
    }


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text("utf-8"))


def wait_until_locked(process: subprocess.Popen, lock: Path) -> None:
    """Waits until ``process`` holds the output folder's lock (its pid is in the lock file)."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert process.poll() is None, "the first run ended before the second one could be started"
        try:
            if json.loads(lock.read_text("utf-8"))["pid"] == process.pid:
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"{lock} never named pid {process.pid}")


@pytest.fixture(scope="module")
def reference(one_thread: None, tmp_path_factory: pytest.TempPathFactory, tiny_args: Callable) -> bytes:
    """attributions.jsonl of one uninterrupted run of 28 items."""
    root = tmp_path_factory.mktemp("reference")
    main([*tiny_args(root), *MORE])
    return (root / OUT / "attributions.jsonl").read_bytes()


@pytest.fixture(scope="module")
def finished(one_thread: None, tmp_path_factory: pytest.TempPathFactory, tiny_args: Callable) -> Path:
    """A finished run of 14 items; tests copy it (:func:`copy_of`) instead of running it again."""
    root = tmp_path_factory.mktemp("finished")
    main(tiny_args(root))
    return root


def copy_of(finished: Path, root: Path) -> Path:
    shutil.copytree(finished / "runs", root / "runs")
    return root / OUT


# -- 1. two runs into one folder at the same time --------------------------------------------------------------


@pytest.mark.parametrize(
    "second", [["--model.init_args.ig.steps", "5"], []], ids=["other-steps", "same-settings"]
)
def test_a_second_concurrent_run_is_refused_at_once_and_the_first_stays_whole(
    tmp_path: Path, tiny_args: Callable, reference: bytes, second: list[str]
) -> None:
    args = [*tiny_args(tmp_path), *MORE]
    folder = tmp_path / OUT
    first = subprocess.Popen(
        knlight_command(args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_until_locked(first, folder / ".lock")
        first.send_signal(signal.SIGSTOP)  # paused in the middle of its run, holding the folder
        before = snapshot(folder, with_lock=True)
        refused = subprocess.run(
            knlight_command([*args, *second]), env=ENV, capture_output=True, text=True, timeout=300
        )
        assert refused.returncode == 2, refused.stderr[-3000:]
        assert "Traceback" not in refused.stderr
        message = refused.stderr.strip().splitlines()[-1]
        assert message.startswith(
            f"knlight: error: {folder} is in use by another knlight run (pid {first.pid} "
        )
        assert (
            f"on host {socket.gethostname()}, started " in message
            and "-m knlight predict --config" in message
        )
        assert (
            "Wait until that run has finished" in message
            and "--trainer.callbacks.init_args.output_dir" in message
        )
        assert snapshot(folder, with_lock=True) == before  # the refused run touched nothing
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read().decode()[-3000:] if first.stderr else ""
    assert summary(folder)["items"] == summary(folder)["computed"] == 28 and summary(folder)["resumed"] == 0
    assert (folder / "attributions.jsonl").read_bytes() == reference  # nothing of the refused run mixed in
    if second:  # after the first run, the folder is still refused to other settings ...
        with pytest.raises(RunFolderError, match=r"different settings \(hparams\.steps; see"):
            main([*args, *second])
    else:  # ... and the same command finds everything done
        main(args)
        assert summary(folder)["computed"] == 0 and summary(folder)["resumed"] == 28
    assert (folder / "attributions.jsonl").read_bytes() == reference


def test_ddp_run_into_a_busy_folder_stops_every_rank_and_a_killed_holder_blocks_nothing(
    tmp_path: Path, tiny_args: Callable, reference: bytes
) -> None:
    args = [*tiny_args(tmp_path), *MORE]
    folder = tmp_path / OUT
    first = subprocess.Popen(
        knlight_command(args), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        wait_until_locked(first, folder / ".lock")
        first.send_signal(signal.SIGSTOP)
        before = snapshot(folder, with_lock=True)
        ddp = subprocess.run(
            knlight_command([*args, "--trainer.devices", "2", "--trainer.strategy", "ddp"]),
            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert ddp.returncode != 0
        assert f"{folder} is in use by another knlight run (pid {first.pid} " in ddp.stderr
        assert snapshot(folder, with_lock=True) == before
    finally:
        first.send_signal(signal.SIGKILL)  # the holder dies without releasing anything itself
        first.wait()
    main(args)  # the kernel dropped the dead run's lock: the same command resumes from its shards
    assert summary(folder)["items"] == 28 and summary(folder)["resumed"] + summary(folder)["computed"] == 28
    assert (folder / "attributions.jsonl").read_bytes() == reference


# -- 2, 3. results are resumed only from the same inputs and known settings -----------------------------------


def test_lines_record_their_inputs_and_run_json_the_model(finished: Path) -> None:
    run = json.loads((finished / OUT / "run.json").read_text("utf-8"))
    identity = run["model"]
    assert identity["name"] == "tiny:gpt2" and identity["type"] == "gpt2" and identity["parameters"] > 0
    assert run["results"]["items"] == 14
    for line in (finished / OUT / "attributions.jsonl").read_text("utf-8").splitlines():
        record = json.loads(line)
        assert record["input_hash"] == input_hash(record["query"], record["answer"])
        assert record["model_hash"] == identity["hash"]


def test_rebuilt_records_with_other_query_texts_are_refused(tmp_path: Path, tiny_args: Callable) -> None:
    records = tmp_path / "records.jsonl"
    shutil.copy(FIXTURE, records)
    args = [*tiny_args(tmp_path), "--data.init_args.path", str(records)]
    main(args)
    folder = tmp_path / OUT
    before = snapshot(folder)
    items = RMLLamaDataModule(str(records), max_facts=1, model_kind="causal").items()
    old = {(i["uuid"], i["language"], i["query_id"]): i for i in items}
    # Rebuild the records file: same facts, languages and query ids, other wording of the English queries.
    rebuilt = [json.loads(line) for line in FIXTURE.read_text("utf-8").splitlines()]
    for record in rebuilt:
        if record["language"] == "en":
            record["queries"] = [q.replace("capital", "chief town") for q in record["queries"]]
    records.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rebuilt), "utf-8")
    new = RMLLamaDataModule(str(records), max_facts=1, model_kind="causal").items()
    changed = [i for i in new if (k := (i["uuid"], i["language"], i["query_id"])) in old and
               old[k]["query"] != i["query"]]  # fmt: skip
    assert 0 < len(changed) < len(new)
    with pytest.raises(RunFolderError) as refused:
        main(args)
    message = str(refused.value)
    example = changed[0]
    key = [example["uuid"], example["language"], example["query_id"]]
    assert message.startswith(f"{folder} holds results of {len(changed)} item(s) of this run's data")
    old_query = old[tuple(key)]["query"]
    assert f"{key}: stored query {old_query!r} -> {example['answer']!r}, now {example['query']!r}" in message
    assert "choose another output folder" in message and "delete the folder to start over" in message
    assert snapshot(folder) == before  # the stale rows are neither used nor deleted: the user decides


def test_other_weights_under_the_same_model_folder_are_refused(tmp_path: Path, tiny_args: Callable) -> None:
    model = tmp_path / "model"

    def save(name: str) -> None:
        lm = load_lm(name)
        lm.model.save_pretrained(model)
        lm.tokenizer.save_pretrained(model)

    args = [*tiny_args(tmp_path), *ZH, "--model.init_args.lm.model", str(model)]
    save("tiny:gpt2")
    main(args)
    before = snapshot(tmp_path / OUT)
    save("tiny:gpt2:7")  # a checkpoint replaced in place: same name, config and shapes, other weights
    with pytest.raises(
        RunFolderError, match=r"different settings \(model\.hash, model\.weights; see .*run\.json"
    ):
        main(args)
    assert snapshot(tmp_path / OUT) == before


def test_results_without_run_json_are_not_taken_for_any_settings(
    tmp_path: Path, tiny_args: Callable, finished: Path
) -> None:
    folder = copy_of(finished, tmp_path)
    (folder / "run.json").unlink()
    before = snapshot(folder)
    for other in (["--model.init_args.ig.steps", "5"], []):  # not even the same settings: they are unknown
        with pytest.raises(RunFolderError) as refused:
            main([*tiny_args(tmp_path), *other])
        message = str(refused.value)
        assert message.startswith(
            f"{folder} holds attribution results (attributions.jsonl or shards) but no run.json"
        )
        assert "the settings that produced them are unknown" in message and "Restore that run.json" in message
        assert snapshot(folder) == before and not (folder / "run.json").exists()


# -- 10, 12. damaged files and bad paths ---------------------------------------------------------------------


def test_a_corrupt_line_on_resume_names_file_and_line(
    tmp_path: Path, tiny_args: Callable, finished: Path
) -> None:
    folder = copy_of(finished, tmp_path)
    merged = folder / "attributions.jsonl"
    whole = merged.read_bytes()
    lines = whole.splitlines(keepends=True)
    merged.write_bytes(b"".join([*lines[:2], lines[2][:40] + b"\n", *lines[3:]]))  # line 3 cut short
    before = snapshot(folder)
    with pytest.raises(RunFolderError) as refused:
        main(tiny_args(tmp_path))
    message = str(refused.value)
    assert (
        f"JSONDecodeError in {merged}:3 (" in message
        and "delete that line (its item is computed again)" in message
    )
    assert snapshot(folder) == before
    merged.write_bytes(b"".join([*lines[:2], *lines[3:]]))  # do as the message says
    main(tiny_args(tmp_path))
    assert summary(folder)["computed"] == 1 and merged.read_bytes() == whole


def test_output_dir_that_is_a_file_is_named(tmp_path: Path, tiny_args: Callable) -> None:
    target = tmp_path / "results"
    target.write_text("my notes\n", "utf-8")
    with pytest.raises(RunFolderError) as refused:
        main([*tiny_args(tmp_path), "--trainer.callbacks.init_args.output_dir", str(target)])
    assert str(refused.value).startswith(
        f"output folder {target} is a file, not a folder; choose another output"
    )
    assert "--trainer.callbacks.init_args.output_dir" in str(refused.value)
    assert target.read_text("utf-8") == "my notes\n"


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_files_get_the_permissions_of_the_umask(
    tmp_path: Path, tiny_args: Callable, umask: int
) -> None:
    previous = os.umask(umask)
    try:
        main([*tiny_args(tmp_path), *ZH, *SCORES, "--trainer.callbacks.init_args.keep_shards", "true"])
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / OUT).rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"attributions.jsonl", "scores.safetensors", "summary.json", "run.json", ".lock"} <= names
    assert any(p.parent.name == "shards" and p.suffix == ".safetensors" for p in files)
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files} == {
        n: oct(0o666 & ~umask) for n in names
    }


def test_missing_relative_paths_name_the_working_directory(
    tmp_path: Path, tiny_args: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    where = (
        f"(looked for {Path.cwd() / 'data' / 'facts.jsonl'}, relative to the working directory {Path.cwd()})"
    )
    with pytest.raises(DataError) as missing:
        main([*tiny_args(tmp_path), "--data.init_args.path", "data/facts.jsonl"])
    assert f"records file data/facts.jsonl does not exist {where}" in str(missing.value)
    with pytest.raises(SelectionError) as missing_run:
        run_selection("runs/nothing", None, num_layers=3, d_ff=64)
    cwd = Path.cwd()
    expected = f"runs/nothing does not exist (looked for {cwd / 'runs' / 'nothing'}, relative to the working "
    assert str(missing_run.value).startswith(expected + f"directory {cwd}); run `knlight predict")


# -- 11, 10. the selection step reads only whole results -----------------------------------------------------


def test_select_refuses_a_truncated_file_and_the_advised_rerun_repairs_it(
    tmp_path: Path, tiny_args: Callable, finished: Path
) -> None:
    folder = copy_of(finished, tmp_path)
    merged = folder / "attributions.jsonl"
    whole = merged.read_bytes()
    merged.write_bytes(b"".join(whole.splitlines(keepends=True)[:5]))  # cut at a line boundary: valid JSONL
    neurons = tmp_path / "neurons.json"
    with pytest.raises(SelectionError) as refused:
        run_selection(str(folder), str(neurons))
    message = str(refused.value)
    assert message.startswith(f"{merged} holds 5 items but {folder / 'summary.json'} records 14: the file is")
    assert "Re-run `knlight predict` with the same config and output folder: it resumes" in message
    assert select_main(["--attributions", str(folder), "--output", str(neurons)]) == 2
    assert not neurons.exists()
    main(tiny_args(tmp_path))  # as the message says
    assert merged.read_bytes() == whole and summary(folder)["computed"] == 9
    assert select_main(["--attributions", str(folder), "--output", str(neurons)]) == 0


def test_select_refuses_a_summary_or_lines_that_do_not_belong_to_run_json(
    tmp_path: Path, tiny_args: Callable, finished: Path
) -> None:
    folder = copy_of(finished, tmp_path)
    summary_file, merged = folder / "summary.json", folder / "attributions.jsonl"
    original = summary_file.read_text("utf-8")
    summary_file.write_text(original.replace('"seconds": ', '"seconds": 1'), "utf-8")  # another run's summary
    with pytest.raises(
        SelectionError, match=r"summary\.json does not belong to the results .*run\.json describes"
    ):
        run_selection(str(folder), None)
    summary_file.write_text(original, "utf-8")
    lines = merged.read_text("utf-8").splitlines(keepends=True)
    merged.write_text("".join([lines[0].replace('"prob":', '"prob":1'), *lines[1:]]), "utf-8")  # same count
    with pytest.raises(
        SelectionError, match=r"attributions\.jsonl was changed after knlight predict wrote it"
    ):
        run_selection(str(folder), None)


def test_select_names_a_damaged_scores_file(tmp_path: Path, tiny_args: Callable) -> None:
    main([*tiny_args(tmp_path), *ZH, *SCORES])
    scores = tmp_path / OUT / "scores.safetensors"
    data = scores.read_bytes()
    scores.write_bytes(data[: len(data) // 2])  # truncated (a full disk, an interrupted copy)
    with pytest.raises(SelectionError) as refused:
        run_selection(str(tmp_path / OUT), None, uncertainty=UncertaintyOptions(enabled=True))
    message = str(refused.value)
    assert message.startswith(f"cannot read the scores file {scores} (SafetensorError: ")
    assert "it is damaged" in message and "Re-run `knlight predict` with the same settings" in message
    argv = ["--attributions", str(tmp_path / OUT), "--uncertainty.enabled", "true"]
    assert select_main(argv) == 2


def test_a_damaged_scores_file_stops_the_merge_and_keeps_the_new_work(
    tmp_path: Path, tiny_args: Callable
) -> None:
    main([*tiny_args(tmp_path), *ZH, *SCORES])
    folder = tmp_path / OUT
    scores = folder / "scores.safetensors"
    scores.write_bytes(scores.read_bytes()[:100])
    before = snapshot(folder)
    with pytest.raises(RunFolderError) as refused:  # more languages: new items to compute and merge
        main([*tiny_args(tmp_path), "--data.init_args.languages", "[zh-hans, de]", *SCORES])
    message = str(refused.value)
    assert message.startswith(f"cannot merge the scores: {scores} is damaged (SafetensorError: ")
    assert "the scores of the items merged so far are lost: choose another output folder" in message
    after = snapshot(folder)
    assert {name: after[name] for name in before} == before  # the merged files are as they were ...
    new = [name for name in after if name.startswith("shards/")]
    assert (
        len(new) == 2 and sum(after[n].count(b"\n") for n in new if n.endswith(".jsonl")) == 4
    )  # ... the work kept


# -- the module's own guard ----------------------------------------------------------------------------------


def test_the_module_never_skips_an_item_whose_stored_inputs_differ() -> None:
    task = AttributionModule(LMOptions("tiny:gpt2"), IGOptions(steps=2))
    task.configure_model()
    item = {"uuid": "P36:Q142:Q90", "language": "en", "relation": "P36", "query_id": 0,
            "query": "The capital of France is [Y].", "answer": "Paris"}  # fmt: skip
    key = ("P36:Q142:Q90", "en", 0)
    task.done_keys, task.done_inputs = {key}, {key: input_hash("France's capital is [Y].", "Paris")}
    with pytest.raises(RunFolderError, match=r"query_id=0: the output folder holds a result computed from"):
        task.predict_step([item])
    task.done_inputs = {key: input_hash(item["query"], item["answer"])}
    assert task.predict_step([item]) == []  # the same inputs: done, skipped
