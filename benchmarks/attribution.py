"""Attribution speed side by side: knlight ``fast`` vs knlight ``reference`` vs EleutherAI ``get_scores``.

Same random-weight models and prompts, m = 20 steps, fp32, CPU. Models: a BERT-base-shaped masked LM (12 layers,
768/3072, mBERT's 119,547-token vocabulary) and a GPT-2-small-shaped causal LM (12 layers, 768/3072, 50,257
tokens). Each engine runs in its own subprocess so peak memory (max RSS above the loaded model) is its own.

    python benchmarks/attribution.py                       # table + benchmarks/results/attribution.json
    python benchmarks/attribution.py --prompts 1 --models gpt2 --engines fast reference

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
}
STEPS = 20


def build(model: str):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from knlight import LanguageModel
    from knlight.lm.tiny import TOKENIZER_KIND, tiny_config, tiny_tokenizer

    if model == "gemma":
        from knlight import load_lm

        return load_lm("gemma3-270m")
    shape = SHAPES[model]
    tokenizer = tiny_tokenizer(TOKENIZER_KIND[model])
    config = tiny_config(
        model,
        shape["vocab"],
        hidden=shape["hidden"],
        ff=shape["ff"],
        layers=shape["layers"],
        heads=shape["heads"],
    )
    config.initializer_range = 0.02
    torch.manual_seed(0)
    auto = AutoModelForMaskedLM if model == "bert" else AutoModelForCausalLM
    return LanguageModel(auto.from_config(config).eval(), tokenizer)


def worker(model: str, engine: str, n_prompts: int, out: str, long: bool = False) -> None:
    """Time one engine on one model; write timings, memory and scores to ``out`` (torch.save)."""
    torch.manual_seed(0)
    lm = build(model)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scores, times = [], []
    prompts = (LONG_PROMPTS if long else PROMPTS)[:n_prompts]
    for query, answer in prompts:
        start = time.perf_counter()
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
            s = attribute(lm, query, answer, steps=STEPS, engine=engine, quadrature=quad)
        times.append(time.perf_counter() - start)
        scores.append(s.detach().float())
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    seq_lens = [len(lm.encode(q, a).input_ids) for q, a in prompts]
    torch.save({"times": times, "peak_mb": peak_mb, "scores": scores, "seq_lens": seq_lens}, out)


def flops(model: str, engine: str, seq_len: int) -> float:
    """Analytic FLOPs per prompt (multiply-add = 2 FLOPs; attention included; one answer token)."""
    sh = SHAPES[model]
    L, d, f, V, m, S = sh["layers"], sh["hidden"], sh["ff"], sh["vocab"], STEPS, seq_len
    # Gemma: gated MLP (3 matrices), grouped-query attention with head_dim 256 (q/o 4 heads, k/v 1 head).
    mlp = 3 * d * f if model == "gemma" else 2 * d * f
    attn = 2 * d * 4 * 256 + 2 * d * 256 if model == "gemma" else 4 * d * d
    per_token_layer = 2 * (attn + mlp) + 4 * S * d
    head = 2 * d * V + (2 * d * d if model == "bert" else 0)
    total = 0.0
    for layer in range(L):
        above = L - layer
        if engine == "fast":
            tokens = S if model == "bert" else 1  # causal rows are single tokens against the clean KV cache
            fwd = m * (tokens * above * per_token_layer + head)
            total += fwd * 2  # backward w.r.t. activations only ≈ 1× forward
        else:
            fwd = m * (S * L * per_token_layer + S * head)  # every layer, full logits at every position
            bwd_factor = 2 if engine == "eleuther" else 1  # EleutherAI also computes weight gradients
            total += fwd + bwd_factor * m * (S * above * per_token_layer + S * head)
    return total


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
    parser.add_argument("--worker", nargs=4, metavar=("MODEL", "ENGINE", "N", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        model, engine, n, out = args.worker
        worker(model, engine, int(n), out, args.long)
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
                env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
                subprocess.run(cmd, check=True, env=env)
                results[engine] = torch.load(out)
            slowest = results.get("eleuther")
            for engine, res in results.items():
                t = sum(res["times"]) / len(res["times"])
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
                        speedup_vs_eleuther=(sum(slowest["times"]) / sum(res["times"])) if slowest else None,
                        speedup_vs_reference=(sum(results["reference"]["times"]) / sum(res["times"]))
                        if "reference" in results
                        else None,
                        max_rel_diff_vs_fast=diff,
                        gflop_per_prompt=gflop,
                        gflops_achieved=gflop / t,
                        seq_len=res["seq_lens"],
                        prompts=len(res["times"]),
                    )
                )
    header = (
        f"{'model':6} {'engine':10} {'s/prompt':>9} {'peak MB':>8} {'vs Eleuther':>11} {'vs ref':>7} "
        f"{'max rel diff':>13} {'GFLOP/prompt':>13} {'GFLOP/s':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        diff = "-" if r["max_rel_diff_vs_fast"] is None else f"{r['max_rel_diff_vs_fast']:.1e}"
        speed = "-" if r["speedup_vs_eleuther"] is None else f"{r['speedup_vs_eleuther']:.1f}x"
        vs_ref = "-" if r["speedup_vs_reference"] is None else f"{r['speedup_vs_reference']:.1f}x"
        print(
            f"{r['model']:6} {r['engine']:10} {r['s_per_prompt']:9.2f} {r['peak_mb']:8.0f} {speed:>11} {vs_ref:>7} "
            f"{diff:>13} "
            f"{r['gflop_per_prompt']:13.1f} {r['gflops_achieved']:8.1f}"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        prompts="long" if args.long else "short",
        steps=STEPS,
        dtype="float32",
        device="cpu",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        note="speed-up = EleutherAI time / engine time on the same prompts; diff = max|x-fast|/max|fast|",
    )
    tmp_out = args.out + ".tmp"
    with open(tmp_out, "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=2)
    os.replace(tmp_out, args.out)


if __name__ == "__main__":
    main()
