"""Attribution speed side by side: knlight ``fast`` vs knlight ``reference`` vs EleutherAI ``get_scores``.

Same random-weight models and prompts, m = 20 steps, fp32, CPU. Models: a BERT-base-shaped masked LM (12 layers,
768/3072, mBERT's 119,547-token vocabulary) and a GPT-2-small-shaped causal LM (12 layers, 768/3072, 50,257
tokens). Each engine runs in its own subprocess so peak memory (max RSS above the loaded model) is its own.

    python benchmarks/attribution.py                       # table + benchmarks/results/attribution.json
    python benchmarks/attribution.py --prompts 1 --models gpt2 --engines fast reference
    python benchmarks/attribution.py --models gemma --engines fast --out benchmarks/results/attribution_gemma.json
    python benchmarks/attribution.py --models llama7b --engines fast --device cuda --dtype bfloat16  # GPU

GFLOP/s are analytic FLOPs (benchmarks/cost_model.py, validated there against torch's FLOP counter) over the
measured time. ``--matmul`` (default for Gemma) also times this machine's dense matmuls at the LM head's and the
FFN's shapes in the same worker, so the engine's throughput can be read against what the hardware gives at
those shapes on the same day. ``llama7b`` is a random-weight Llama-2-7B-shaped model built from a config (no
hub; 13.5 GB in bf16, meant for a GPU: benchmarks/gpu_check.sh).

EleutherAI's ``knowledge-neurons`` (PyPI 0.0.2, install with ``pip install --no-deps knowledge-neurons einops
tqdm``) attributes GPT-2's *pre-activation* ``c_fc`` output (a definition knlight does not copy), so its GPT-2
scores are not expected to match; its BERT site is the same as knlight's and must match to 1e-4.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = [
    ("The capital of France is [Y].", "Paris"),
    ("The official language of Japan is [Y].", "Japanese"),
    ("Albert Einstein was born in [Y].", "Ulm"),
]
# Realistic cloze prompts are longer; the causal speed-up grows with prompt length (rows are single tokens).
LONG_PROMPTS = [
    (
        "According to the encyclopedia and to every atlas printed in the last century, the capital of France is [Y].",
        "Paris",
    ),
    (
        "Everyone who has studied the history of the region knows that the official language of Japan is [Y].",
        "Japanese",
    ),
]
SHAPES = {
    "bert": dict(vocab=119_547, layers=12, hidden=768, ff=3072, heads=12),
    "gpt2": dict(vocab=50_257, layers=12, hidden=768, ff=3072, heads=12),
    # Real Gemma 3 270M weights (extra `gemma`); EleutherAI's package does not support it.
    "gemma": dict(vocab=262_144, layers=18, hidden=640, ff=2048, heads=4),
    # Random weights, Llama-2-7B's shape (for GPUs: benchmarks/gpu_check.sh).
    "llama7b": dict(vocab=32_000, layers=32, hidden=4096, ff=11_008, heads=32),
    # The same code path at a CPU-sized shape (a dry run of benchmarks/gpu_check.sh).
    "llamasmall": dict(vocab=32_000, layers=4, hidden=256, ff=688, heads=4),
}
COST_SHAPE = {
    "bert": "bert-base-mbert",
    "gpt2": "gpt2-small",
    "gemma": "gemma3-270m",
    "llama7b": "llama2-7b",
    "llamasmall": "llama-small",
}
"""The cost-model shape (benchmarks/cost_model.py) of each benchmark model."""
STEPS = 20


def build(model: str, device: str = "cpu", dtype: str = "float32"):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from knlight import LanguageModel
    from knlight.lm.tiny import TOKENIZER_KIND, tiny_config, tiny_tokenizer

    torch_dtype = getattr(torch, dtype)
    if model == "gemma":
        from knlight import load_lm

        lm = load_lm("gemma3-270m")
        lm.model.to(device=device, dtype=torch_dtype)
        return lm
    shape = SHAPES[model]
    arch = "llama" if model.startswith("llama") else model
    tokenizer = tiny_tokenizer(TOKENIZER_KIND[arch])
    extra = dict(num_key_value_heads=shape["heads"], max_position_embeddings=4096) if arch == "llama" else {}
    config = tiny_config(
        arch,
        shape["vocab"],
        hidden=shape["hidden"],
        ff=shape["ff"],
        layers=shape["layers"],
        heads=shape["heads"],
        **extra,
    )
    config.initializer_range = 0.02
    torch.manual_seed(0)
    auto = AutoModelForMaskedLM if model == "bert" else AutoModelForCausalLM
    with torch.device(device):  # built in place: a 7B model never exists in fp32 on the host
        net = auto.from_config(config, dtype=torch_dtype).eval()
    return LanguageModel(net, tokenizer)


def matmul_gflops(shapes: list[tuple[int, int, int]], device: str, dtype: torch.dtype) -> list[float]:
    """This machine's dense ``[M, K] @ [K, N]`` throughput (median of 5) at each shape, in GFLOP/s: per CPU second
    of this process on CPU (as the engine's ``/cpu s`` figure; a shared machine's waits drop out), wall on GPU."""
    out = []
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        clock = time.perf_counter if device.startswith("cuda") else time.process_time
        took = []
        for _ in range(6):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            start = clock()
            a @ b
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            took.append(clock() - start)
        out.append(2 * m * k * n / sorted(took[1:])[2] / 1e9)
    return out


def worker(
    model: str,
    engine: str,
    n_prompts: int,
    out: str,
    long: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    chunk_rows: str | None = None,
    matmul: bool = False,
) -> None:
    """Time one engine on one model; write timings, memory and scores to ``out`` (torch.save)."""
    torch.manual_seed(0)
    lm = build(model, device, dtype)
    rows = None if chunk_rows is None else (chunk_rows if chunk_rows == "auto" else int(chunk_rows))
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        base_bytes = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scores, times = [], []
    prompts = (LONG_PROMPTS if long else PROMPTS)[:n_prompts]
    cpu_times = []
    for query, answer in prompts:
        start, cpu_start = time.perf_counter(), time.process_time()
        if engine == "eleuther":
            from knowledge_neurons import KnowledgeNeurons

            kn = KnowledgeNeurons(lm.model, lm.tokenizer, model_type=model, device="cpu")
            lm.model.requires_grad_(True)  # as a user of that package has it: parameters are not frozen
            if model == "bert":
                prompt, target = query.replace("[Y]", "[MASK]"), answer
            else:
                prompt, target = query.split("[Y]")[0].rstrip(), " " + answer
            s = kn.get_scores(prompt, target, batch_size=STEPS, steps=STEPS, pbar=False)
        else:
            from knlight import attribute

            quad = "eleuther" if model == "bert" else "riemann_right"
            s = attribute(lm, query, answer, steps=STEPS, engine=engine, quadrature=quad, chunk_rows=rows)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        scores.append(s.detach().float().cpu())
    if device.startswith("cuda"):
        peak_mb = (torch.cuda.max_memory_allocated() - base_bytes) / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    seq_lens = [len(lm.encode(q, a).input_ids) for q, a in prompts]
    result = {
        "times": times,
        "cpu_times": cpu_times,
        "peak_mb": peak_mb,
        "scores": scores,
        "seq_lens": seq_lens,
    }
    if matmul:
        # The head's and the FFN's matmuls at the row counts the fast engine runs them with (one query).
        sh = SHAPES[model]
        d, f, v, rows_ = sh["hidden"], sh["ff"], sh["vocab"], STEPS * sh["layers"]
        shapes = {"head": (rows_, d, v), "ffn_up": (rows_, d, f), "ffn_down": (rows_, f, d)}
        gflops = matmul_gflops(list(shapes.values()), device, getattr(torch, dtype))
        result["matmul"] = {name: dict(shape=s, gflops=g) for (name, s), g in zip(shapes.items(), gflops)}
    torch.save(result, out)


def flops(model: str, engine: str, seq_len: int) -> float:
    """Analytic FLOPs per prompt of an engine (benchmarks/cost_model.py; multiply-add = 2 FLOPs)."""
    from cost_model import SHAPES as COST_SHAPES
    from cost_model import method_flops

    method = {"fast": "ig", "reference": "reference", "eleuther": "eleuther"}[engine]
    return method_flops(method, COST_SHAPES[COST_SHAPE[model]], seq_len, STEPS)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["gpt2", "bert"], choices=sorted(SHAPES))
    parser.add_argument("--engines", nargs="+", default=["fast", "reference", "eleuther"])
    parser.add_argument("--prompts", type=int, default=2, help="prompts per model (max 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in each worker")
    parser.add_argument("--out", default="benchmarks/results/attribution.json")
    parser.add_argument("--long", action="store_true", help="use the long prompts (~20-35 tokens)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--chunk-rows", default=None, help="the fast engine's chunk_rows (a number or auto)")
    parser.add_argument(
        "--matmul",
        action="store_true",
        help="also time dense matmuls at the head/FFN shapes (default: Gemma)",
    )
    parser.add_argument("--worker", nargs=4, metavar=("MODEL", "ENGINE", "N", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model, engine, n, out = args.worker
        worker(
            model, engine, int(n), out, args.long, args.device, args.dtype, args.chunk_rows,
            args.matmul or (model in ("gemma", "llama7b", "llamasmall") and engine == "fast"),
        )  # fmt: skip
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            results = {}
            for engine in args.engines:
                if engine == "eleuther" and model == "gemma":
                    continue
                if engine == "eleuther":
                    try:
                        import knowledge_neurons  # noqa: F401
                    except ImportError:
                        print(
                            "skipping eleuther: pip install --no-deps knowledge-neurons einops tqdm",
                            file=sys.stderr,
                        )
                        continue
                out = os.path.join(tmp, f"{model}-{engine}.pt")
                cmd = [sys.executable, __file__, "--worker", model, engine, str(args.prompts), out]
                cmd += ["--long"] if args.long else []
                cmd += ["--device", args.device, "--dtype", args.dtype] + (
                    ["--matmul"] if args.matmul else []
                )
                cmd += ["--chunk-rows", args.chunk_rows] if args.chunk_rows else []
                env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
                subprocess.run(cmd, check=True, env=env)
                results[engine] = torch.load(out)
            slowest = results.get("eleuther")
            for engine, res in results.items():
                t = sum(res["times"]) / len(res["times"])
                cpu = sum(res["cpu_times"]) / len(res["cpu_times"])
                diff = None
                if "fast" in results and engine != "fast":
                    diff = max(
                        float((a - b).abs().max() / b.abs().max())
                        for a, b in zip(results["fast"]["scores"], res["scores"])
                    )
                gflop = sum(flops(model, engine, s) for s in res["seq_lens"]) / len(res["seq_lens"]) / 1e9
                rows.append(
                    dict(
                        model=model,
                        engine=engine,
                        s_per_prompt=t,
                        peak_mb=res["peak_mb"],
                        cpu_s_per_prompt=cpu,
                        speedup_vs_eleuther=(sum(slowest["times"]) / sum(res["times"])) if slowest else None,
                        cpu_speedup_vs_eleuther=(sum(slowest["cpu_times"]) / sum(res["cpu_times"]))
                        if slowest
                        else None,
                        speedup_vs_reference=(sum(results["reference"]["times"]) / sum(res["times"]))
                        if "reference" in results
                        else None,
                        max_rel_diff_vs_fast=diff,
                        gflop_per_prompt=gflop,
                        gflops_achieved=gflop / t,
                        gflops_per_cpu_s=gflop / cpu,
                        seq_len=res["seq_lens"],
                        prompts=len(res["times"]),
                        queries_per_s=1 / t,
                    )
                )
                if "matmul" in res:
                    # The engine's GFLOP/s against the same machine's dense matmuls at its shapes, same run.
                    mm = res["matmul"]
                    rows[-1]["matmul_gflops"] = {k: v["gflops"] for k, v in mm.items()}
                    rows[-1]["matmul_shapes"] = {k: v["shape"] for k, v in mm.items()}
                    rate = gflop / (t if args.device.startswith("cuda") else cpu)
                    rows[-1]["share_of_matmul"] = {k: rate / v["gflops"] for k, v in mm.items()}
                    # The FLOP floor: the engine's FLOPs at the best of those matmul rates.
                    rows[-1]["floor_s_per_prompt"] = gflop / max(v["gflops"] for v in mm.values())
    header = (
        f"{'model':6} {'engine':10} {'s/prompt':>9} {'cpu s':>7} {'peak MB':>8} {'vs Eleuther':>11} "
        f"{'(cpu)':>7} {'vs ref':>7} {'max rel diff':>13} {'GFLOP/prompt':>13} {'GFLOP/s':>8} {'/cpu s':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        diff = "-" if r["max_rel_diff_vs_fast"] is None else f"{r['max_rel_diff_vs_fast']:.1e}"
        speed = "-" if r["speedup_vs_eleuther"] is None else f"{r['speedup_vs_eleuther']:.1f}x"
        vs_ref = "-" if r["speedup_vs_reference"] is None else f"{r['speedup_vs_reference']:.1f}x"
        cpu_speed = "-" if r["cpu_speedup_vs_eleuther"] is None else f"{r['cpu_speedup_vs_eleuther']:.1f}x"
        print(
            f"{r['model']:6} {r['engine']:10} {r['s_per_prompt']:9.2f} {r['cpu_s_per_prompt']:7.2f} "
            f"{r['peak_mb']:8.0f} {speed:>11} {cpu_speed:>7} {vs_ref:>7} {diff:>13} "
            f"{r['gflop_per_prompt']:13.1f} {r['gflops_achieved']:8.1f} {r['gflops_per_cpu_s']:7.1f}"
        )
        if "matmul_gflops" in r:
            parts = ", ".join(
                f"{k} {tuple(r['matmul_shapes'][k])} {g:.1f} GFLOP/s ({100 * r['share_of_matmul'][k]:.0f}%)"
                for k, g in r["matmul_gflops"].items()
            )
            print(
                f"       dense matmul same run: {parts}; {r['queries_per_s']:.3f} queries/s; FLOP floor "
                f"{r['floor_s_per_prompt']:.2f} s/prompt"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        prompts="long" if args.long else "short",
        steps=STEPS,
        dtype=args.dtype,
        device=args.device,
        chunk_rows=args.chunk_rows,
        threads=args.threads or torch.get_num_threads(),
        torch=torch.__version__,
        note="speed-up = EleutherAI time / engine time on the same prompts (wall, and process CPU time: steadier "
        "on a shared machine); diff = max|x-fast|/max|fast|; GFLOP from benchmarks/cost_model.py",
    )
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from knlight.io import write_text_atomically

    write_text_atomically(Path(args.out), json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
