"""`knlight fit` (editing) with DDP over 2 CPU processes equals one process with the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import run_knlight_ddp
from safetensors.torch import load_file
from test_editing import fit_args, run_dir, table, write_neurons

from knlight.cli import main


def test_ddp_fit_equals_single_process(tmp_path: Path) -> None:
    neurons = write_neurons(tmp_path / "neurons.json")
    # Minibatches: 2 facts × 2 edit queries = 4 edit rows, global batch 2 (1 per process): every step sees a
    # different seeded subset, so this also checks that both runs lay out and shard the schedule alike.
    common = ("--model.init_args.requests.edit_queries", "2", "--model.init_args.training.steps", "6")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each DDP worker below
    try:
        main(fit_args(tmp_path / "single", neurons, *common, "--data.init_args.batch_size", "2"))
    finally:
        torch.set_num_threads(threads)
    args = fit_args(tmp_path / "ddp", neurons, *common, "--data.init_args.batch_size", "1")
    run_knlight_ddp(args, cwd=tmp_path, timeout=300)

    single = load_file(run_dir(tmp_path / "single") / "edit.safetensors")
    ddp = load_file(run_dir(tmp_path / "ddp") / "edit.safetensors")
    assert single.keys() == ddp.keys() and torch.equal(single["neurons"], ddp["neurons"])
    for name in ("in_weight", "in_bias", "out_weight"):
        assert torch.count_nonzero(single[name]) > 0
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-4, atol=1e-6)

    info = json.loads((run_dir(tmp_path / "ddp") / "editing_val.json").read_text(encoding="utf-8"))
    assert info["world_size"] == 2
    one, two = (
        table(run_dir(tmp_path / "single") / "editing_val.json"),
        table(run_dir(tmp_path / "ddp") / "editing_val.json"),
    )
    assert one.keys() == two.keys()
    for key, value in one.items():  # every row counted once across the two processes
        assert abs(two[key] - value) <= 1e-4 * max(1.0, abs(value)), key
