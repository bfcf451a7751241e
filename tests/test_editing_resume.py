"""A killed `knlight fit` (SIGKILL, mid-epoch) resumes when re-run and ends with the uninterrupted run's edit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import run_knlight_ddp
from lightning.pytorch import Callback, LightningModule, Trainer
from safetensors.torch import load_file
from test_editing import UUIDS, fit_args, run_dir, table, write_neurons

from knlight import load_lm
from knlight.callbacks.fit_resume import FitResumeError
from knlight.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
# Sequential editing with disjoint neuron sets: group 1 must start with fresh optimizer state.
SEQUENTIAL = {UUIDS[0]: [[1, 40], [2, 42], [2, 57]], UUIDS[1]: [[1, 54], [2, 10], [2, 2]]}


class StopOnce(Callback):
    """Test harness: the first time the run reaches ``step`` (no ``marker`` yet) it creates ``marker`` and then
    waits to be killed (``how: sleep``) or raises (``how: crash``). A re-run of the same command (the marker
    exists) runs through, so the kill lands at a known step between two checkpoints.

    Args:
        step: Global step after which to stop.
        marker: File that says the run has stopped there.
        how: ``sleep`` (for SIGKILL) or ``crash`` (an exception).
    """

    def __init__(self, step: int, marker: str, how: str = "sleep") -> None:
        self.step, self.marker, self.how = step, Path(marker), how

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        if trainer.global_step != self.step or self.marker.exists():
            return
        self.marker.write_text(str(os.getpid()), encoding="utf-8")
        if self.how == "crash":
            raise RuntimeError(f"simulated crash after step {self.step}")
        time.sleep(600)


def stop_args(marker: Path, step: int, how: str = "sleep") -> list[str]:
    return [
        "--trainer.callbacks+=test_editing_resume.StopOnce",
        "--trainer.callbacks.init_args.step", str(step),
        "--trainer.callbacks.init_args.marker", str(marker),
        "--trainer.callbacks.init_args.how", how,
    ]  # fmt: skip


def knlight_process(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-m", "knlight", *args], cwd=cwd, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def kill_at_marker(process: subprocess.Popen, marker: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert marker.exists(), f"the run never reached the stop step: {process.stderr and process.stderr.read()}"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL


def rerun(args: list[str], cwd: Path) -> None:
    process = knlight_process(args, cwd)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]


def checkpoint(root: Path, version: int = 0) -> dict:
    return torch.load(run_dir(root, version) / "checkpoints" / "last.ckpt", weights_only=True)


def assert_same_edit(root: Path, reference: Path, version: int = 0) -> float:
    """The edit and the validation table equal the reference run's; returns the largest delta difference."""
    ours, theirs = (
        load_file(run_dir(r, v) / "edit.safetensors") for r, v in ((root, version), (reference, 0))
    )
    assert ours.keys() == theirs.keys()
    diff = max(float((ours[k].double() - theirs[k].double()).abs().max()) for k in ours)
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), f"{name}: max abs diff {diff:.3g}"
    assert torch.count_nonzero(ours["out_weight"]) > 0
    assert table(run_dir(root, version) / "editing_val.json") == table(
        run_dir(reference) / "editing_val.json"
    )
    return diff


def versions(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "runs" / "tiny-edit").iterdir())


@pytest.fixture(scope="module")
def neurons(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_neurons(tmp_path_factory.mktemp("neurons") / "neurons.json")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, neurons: Path) -> Path:
    """The reference: the same fit (20 steps, last.ckpt every 5), never interrupted."""
    root = tmp_path_factory.mktemp("uninterrupted")
    main(fit_args(root, neurons))
    return root


# ----------------------------------------------------------------------------------------------------------
# SIGKILL mid-epoch, then the same command


def test_sigkill_mid_epoch_then_the_same_command_resumes_to_the_uninterrupted_edit(
    tmp_path: Path, neurons: Path, uninterrupted: Path
) -> None:
    args = fit_args(tmp_path, neurons, *stop_args(tmp_path / "stopped", 13))
    kill_at_marker(knlight_process(args, tmp_path), tmp_path / "stopped")
    run = run_dir(tmp_path)
    assert not (run / "edit.safetensors").exists() and not (run / "editing_val.json").exists()
    saved = checkpoint(tmp_path)
    assert saved["global_step"] == 10  # every 5 steps: steps 11-13 are lost and redone
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"batches_done": 10, "rows": 80}]
    # Only the deltas (and optimizer/loop state): no weight of the frozen model.
    assert set(saved["state_dict"]) == {
        "edit.in_weight",
        "edit.in_bias",
        "edit.out_weight",
        "edit.neuron_ids",
    }
    model_bytes = sum(p.numel() * p.element_size() for p in load_lm("tiny:gpt2").model.parameters())
    assert (run / "checkpoints" / "last.ckpt").stat().st_size < model_bytes / 4

    rerun(args, tmp_path)  # the same command
    assert versions(tmp_path) == ["version_0"]  # the same run folder, no version_1
    record = json.loads((run / "fit.json").read_text(encoding="utf-8"))
    assert [r["ckpt_path"] for r in record["resumed"]] == [str(run / "checkpoints" / "last.ckpt")]
    assert assert_same_edit(tmp_path, uninterrupted) == 0.0


def test_ckpt_path_last_resumes_the_killed_run_in_its_folder(
    tmp_path: Path, neurons: Path, uninterrupted: Path
) -> None:
    args = fit_args(tmp_path, neurons, *stop_args(tmp_path / "stopped", 7))
    kill_at_marker(knlight_process(args, tmp_path), tmp_path / "stopped")
    assert checkpoint(tmp_path)["global_step"] == 5
    main([*args, "--ckpt_path", "last"])
    assert versions(tmp_path) == ["version_0"]
    assert_same_edit(tmp_path, uninterrupted)


def test_sequential_editing_resumes_into_the_second_group(tmp_path: Path) -> None:
    neurons = write_neurons(tmp_path / "sequential.json", SEQUENTIAL)
    sequential = ("--model.init_args.requests.edits", json.dumps([{"uuid": u} for u in SEQUENTIAL]),
                  "--model.init_args.requests.edits_per_group", "1",
                  "--model.init_args.training.steps", "10")  # fmt: skip
    main(fit_args(tmp_path / "whole", neurons, *sequential))
    args = fit_args(tmp_path / "killed", neurons, *sequential, *stop_args(tmp_path / "stopped", 12))
    kill_at_marker(knlight_process(args, tmp_path), tmp_path / "stopped")
    saved = checkpoint(tmp_path / "killed")
    # The checkpoint is the last step of group 0; the kill came in group 1, which must start afresh.
    assert saved["global_step"] == 10 and saved["knlight_editing"]["group"] == 0
    assert saved["optimizer_states"][0]["state"]  # group 0's Adam moments, to be dropped at group 1
    rerun(args, tmp_path)
    assert versions(tmp_path / "killed") == ["version_0"]
    assert_same_edit(tmp_path / "killed", tmp_path / "whole")


def test_a_crashed_single_process_run_resumes_under_ddp_with_the_same_global_batch(
    tmp_path: Path, neurons: Path, uninterrupted: Path
) -> None:
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(fit_args(tmp_path, neurons, *stop_args(tmp_path / "stopped", 13, "crash")))
    # 2 processes × 2 rows = the same global batch of 4: the same settings, so the run resumes from step 10.
    run_knlight_ddp(
        fit_args(tmp_path, neurons, "--data.init_args.batch_size", "2"), cwd=tmp_path, timeout=300
    )
    assert versions(tmp_path) == ["version_0"]
    info = json.loads((run_dir(tmp_path) / "editing_val.json").read_text("utf-8"))
    assert info["world_size"] == 2 and info["global_step"] == 20
    resumed, reference = (load_file(run_dir(r) / "edit.safetensors") for r in (tmp_path, uninterrupted))
    for name in ("in_weight", "in_bias", "out_weight"):  # other reduction order: equal to float rounding
        torch.testing.assert_close(resumed[name], reference[name], rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# which run resumes


def test_other_settings_are_refused_new_runs_start_beside_and_finished_runs_are_not_resumed(
    tmp_path: Path, neurons: Path, uninterrupted: Path
) -> None:
    args = fit_args(tmp_path, neurons, *stop_args(tmp_path / "stopped", 13, "crash"))
    with pytest.raises(RuntimeError, match="simulated crash after step 13"):
        main(args)
    assert checkpoint(tmp_path)["global_step"] == 10

    with pytest.raises(FitResumeError, match=r"other settings \(model\.steps: 20 -> 30.*resume new") as error:
        main(fit_args(tmp_path, neurons, "--model.init_args.training.steps", "30"))
    assert str(run_dir(tmp_path) / "fit.json") in str(error.value)
    assert versions(tmp_path) == ["version_0"]

    main(
        fit_args(
            tmp_path,
            neurons,
            "--model.init_args.training.steps",
            "30",
            "--trainer.callbacks.init_args.resume",
            "new",
        )
    )
    assert versions(tmp_path) == ["version_0", "version_1"]
    assert json.loads((run_dir(tmp_path, 1) / "editing_val.json").read_text("utf-8"))["global_step"] == 30

    main(args)  # the crashed run's own settings: resumes version_0 (the newest unfinished run of them)
    assert versions(tmp_path) == ["version_0", "version_1"]
    assert_same_edit(tmp_path, uninterrupted)

    main(args)  # version_0 is finished now: a new run
    assert versions(tmp_path) == ["version_0", "version_1", "version_2"]
    assert not json.loads((run_dir(tmp_path, 2) / "fit.json").read_text("utf-8"))["resumed"]
    assert_same_edit(tmp_path, uninterrupted, version=2)


def test_corrupt_checkpoint_record_or_busy_folder_get_clear_errors(tmp_path: Path, neurons: Path) -> None:
    args = fit_args(tmp_path, neurons, *stop_args(tmp_path / "stopped", 13, "crash"))
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(args)
    run = run_dir(tmp_path)
    ckpt = run / "checkpoints" / "last.ckpt"
    whole = ckpt.read_bytes()
    ckpt.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(
        FitResumeError, match=r"last\.ckpt: the checkpoint of this unfinished run is truncated"
    ):
        main(args)
    ckpt.write_bytes(whole)

    record = (run / "fit.json").read_text("utf-8")
    (run / "fit.json").write_text(record[:-20], encoding="utf-8")
    with pytest.raises(FitResumeError, match=r"fit\.json:\d+: malformed JSON.*delete .*version_0"):
        main(args)
    (run / "fit.json").write_text(record, encoding="utf-8")

    hold = (  # another process holding the run folder's lock (as a concurrent `knlight fit` would)
        "import fcntl, sys, time\n"
        "f = open(sys.argv[1], 'a')\n"
        "for _ in range(300):\n"
        "    try:\n"
        "        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB); break\n"
        "    except BlockingIOError:\n"
        "        time.sleep(0.1)\n"
        "else:\n"
        "    print('busy', flush=True); sys.exit(1)\n"
        "print('locked', flush=True); time.sleep(120)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", hold, str(run / ".fit.lock")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(FitResumeError, match=r"another `knlight fit` is running in .*version_0"):
            main(args)
    finally:
        holder.kill()
        holder.wait()
    main(args)  # nothing was lost: the run resumes and finishes
    assert (run / "edit.safetensors").is_file() and versions(tmp_path) == ["version_0"]


def test_the_edit_file_describes_its_optimizer_and_model(uninterrupted: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(run_dir(uninterrupted) / "edit.safetensors"), framework="pt") as f:
        metadata = f.metadata()
    optimizer = json.loads(metadata["optimizer"])
    assert optimizer["class_path"] == "torch.optim.Adam" and optimizer["init_args"]["lr"] == 0.01
    assert "0x" not in metadata["optimizer"]  # no memory addresses
    base = json.loads(metadata["base_model"])
    assert base["name"] == "tiny:gpt2" and base["dtype"] == "float32" and len(base["sketch"]) == 8


# ----------------------------------------------------------------------------------------------------------
# atomic writers


def test_editing_tables_survive_a_full_disk(tmp_path: Path) -> None:
    from knlight.metrics.editing import write_table

    row = {
        "method": "edited",
        "role": "reliability",
        "measure": "rank",
        "language": "en",
        "value": 1.0,
        "count": 2,
    }
    umask = os.umask(0o022)
    try:
        write_table([row], tmp_path, "editing_val", {"stage": "val"})
    finally:
        os.umask(umask)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["editing_val.csv", "editing_val.json"]
    assert all((tmp_path / name).stat().st_mode & 0o777 == 0o644 for name in before)
    # A full disk, for real: the file size limit of a child process (writes past it fail with EFBIG).
    script = (
        "import errno, resource, signal, sys\n"
        "from knlight.metrics.editing import write_table\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))\n"
        f"rows = [{row!r}] * 1000\n"
        "try:\n"
        "    write_table(rows, sys.argv[1], 'editing_val', {'stage': 'val'})\n"
        "except OSError as error:\n"
        "    sys.exit(0 if error.errno == errno.EFBIG else 1)\n"
        "sys.exit(2)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # intact, no temporary file left
