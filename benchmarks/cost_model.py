"""Cost model of neuron attribution: FLOPs and peak memory per query, validated on CPU, projected to LLMs.

FLOPs (multiply-add = 2) and peak memory as functions of layers L, width d, FFN width f, vocabulary V, prompt
length S, steps m, for:

* ``ig``: knlight's exact IG, fast engine (causal rows are single tokens over the clean KV; masked rows whole
  sequences from the block above their own, whose FFN output changes at the target only, and only the target
  in the last block; rows start at their layer; head only at the target; backward w.r.t. activations only);
* ``grad_x_act``: one forward and one backward of the clean prompt (knlight; causal: the prefix before the target
  once without autograd into a KV cache, the forward and backward of the target token only);
* ``steps1_zero``: one row per layer at α = 0 on the fast engine (what EasyEdit's ``steps: 1`` configs compute);
* ``joint_ig``: m rows along one path scaling all layers (causal: single tokens from the target on);
* ``eleuther``: EleutherAI knowledge-neurons ``get_scores``: per layer, a clean forward plus m full-sequence
  forwards with full logits and the backward of all S positions from the top down to the layer;
* ``easyedit``: EasyEdit's KN (a copy of the EleutherAI algorithm) with its configs' ``steps: 1``;
* ``reference``: knlight's reference engine (m full forwards per layer, full logits, backward to the layer).

Validation (``--validate``): on CPU shapes the model's FLOPs are compared with torch's FLOP counter
(``torch.utils.flop_counter``, every matmul and attention of forward and backward) and its peak memory with
torch's CPU memory profiler (live tensor bytes above the loaded model); both must agree within ±25 %. Then
``--project`` writes per-query seconds and memory for 7B-70B models on one GPU of a stated peak, **a projection**
(FLOPs ÷ (peak × an assumed utilisation); memory = weights + the modelled working set).

    python benchmarks/cost_model.py --validate --project   # -> benchmarks/results/cost_model.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS = ("ig", "grad_x_act", "steps1_zero", "joint_ig", "eleuther", "easyedit", "reference")


@dataclass(frozen=True)
class Shape:
    """A transformer's sizes (attention: ``heads`` query heads of ``head_dim``, ``kv_heads`` key/value heads)."""

    layers: int
    d: int
    f: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    gated: bool = False
    masked: bool = False
    params_b: float = 0.0  # billions of parameters (for weight memory; 0: counted from the sizes)

    def block(self, context: int) -> float:
        """Forward FLOPs of one token through one block attending to ``context`` keys."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attn = 2 * self.d * (2 * q + 2 * kv)
        mlp = 2 * self.d * self.f * (3 if self.gated else 2)
        return attn + mlp + 4 * context * q

    def down(self) -> float:
        """Forward FLOPs of the FFN's output projection of one token (where the attributed activation enters)."""
        return 2 * self.f * self.d

    def last_block_at_target(self, context: int) -> float:
        """Forward FLOPs of a masked row's last block when only its target position is read: keys and values at
        every position, the query, output projection and FFN at the target only."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        mlp = 2 * self.d * self.f * (3 if self.gated else 2)
        return context * 2 * self.d * 2 * kv + 2 * self.d * 2 * q + mlp + 4 * context * q

    def head(self) -> float:
        """LM-head FLOPs of one row (BERT's transform included)."""
        return 2 * self.d * self.vocab + (2 * self.d * self.d if self.masked else 0)

    def weights(self) -> float:
        """Parameter count."""
        if self.params_b:
            return self.params_b * 1e9
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_layer = self.d * (2 * q + 2 * kv) + self.d * self.f * (3 if self.gated else 2)
        return self.layers * per_layer + self.vocab * self.d


SHAPES = {
    # Measured here (random weights, fp32 CPU), and the benchmark models.
    "gpt2-small": Shape(12, 768, 3072, 50257, 12, 12, 64),
    "bert-base-mbert": Shape(12, 768, 3072, 119547, 12, 12, 64, masked=True),
    "gemma3-270m": Shape(18, 640, 2048, 262144, 4, 1, 256, gated=True),
    "gpt2-mini": Shape(6, 384, 1536, 50257, 6, 6, 64),
    "llama-mini": Shape(6, 384, 1536, 32000, 6, 2, 64, gated=True),
    "bert-mini": Shape(6, 384, 1536, 30000, 6, 6, 64, masked=True),
    "llama-small": Shape(4, 256, 688, 32000, 4, 4, 64, gated=True),
    # Projected (published configs).
    "llama2-7b": Shape(32, 4096, 11008, 32000, 32, 32, 128, gated=True, params_b=6.74),
    "llama3-8b": Shape(32, 4096, 14336, 128256, 32, 8, 128, gated=True, params_b=8.03),
    "qwen2.5-7b": Shape(28, 3584, 18944, 152064, 28, 4, 128, gated=True, params_b=7.62),
    "llama3-70b": Shape(80, 8192, 28672, 128256, 64, 8, 128, gated=True, params_b=70.6),
}


def method_flops(method: str, sh: Shape, seq_len: int, steps: int) -> float:
    """FLOPs per query (one target token, all layers attributed)."""
    L, S, m = sh.layers, seq_len, steps
    clean = S * L * sh.block(S) + sh.head()
    if method in ("ig", "steps1_zero"):
        rows = m if method == "ig" else 1
        total = clean
        # The sweep; steps1_zero's only node is α = 0, so the engine's self-check (a row at α = 1 must give the
        # model's log P) adds one row per layer. Quadratures with an α = 1 node check inside the sweep.
        passes = [(rows, rows)] + ([(1, 1)] if method == "steps1_zero" else [])
        for n_rows, group in passes:
            for layer in range(L):
                if sh.masked:
                    # The row's own block: one clean call per sequence, then the FFN output at the target
                    # changes by (a − a_clean)·W_outᵀ; blocks above whole sequences; the last block (when it is
                    # not the own one) only at the target; forward and backward alike.
                    total += S * sh.block(S)
                    middle = max(L - layer - 2, 0) * S * sh.block(S)
                    last = sh.last_block_at_target(S) if layer < L - 1 else 0.0
                    total += n_rows * 2 * (sh.down() + middle + last + sh.head())
                    continue
                above = L - layer
                fwd = above * sh.block(S + group) + sh.head()
                bwd = (above - 1) * sh.block(S + group) + sh.down() + sh.head()
                total += n_rows * (fwd + bwd)
        return total
    if method == "grad_x_act":
        if sh.masked:
            return 2 * clean
        # Causal: the prefix before the target once without autograd into a KV cache, then the target token's
        # forward and backward over it (knlight/neurons/approx.py).
        return (S - 1) * L * sh.block(S) + 2 * (L * sh.block(S) + sh.head())
    if method == "joint_ig":
        tokens, context = (S, S) if sh.masked else (1, S + 1)
        # A clean pass with full logits (activations), the causal prefix's keys/values, then m rows.
        prefix = 0 if sh.masked else S * L * sh.block(S)
        return (
            S * L * sh.block(S)
            + S * sh.head()
            + prefix
            + 2 * m * (tokens * L * sh.block(context) + sh.head())
        )
    if method in ("eleuther", "easyedit", "reference"):
        rows = 1 if method == "easyedit" else m
        full = S * L * sh.block(S) + S * sh.head()
        total = 0.0 if method == "reference" else L * full  # eleuther: a clean forward per layer
        total += clean if method == "reference" else 0.0
        for layer in range(L):
            bwd = S * (L - layer - 1) * sh.block(S) + S * sh.down() + S * sh.head()
            total += rows * (full + bwd)
        return total
    raise ValueError(f"unknown method {method!r}")


def method_peak_bytes(method: str, sh: Shape, seq_len: int, steps: int, element: int = 4) -> float:
    """Working memory beyond the weights (bytes) of one query, at the smallest chunk that keeps the method's
    batching (knlight: one problem's m rows; EleutherAI: ``batch_size = steps``)."""
    from knlight.neurons.memory import ModelShape

    S, m = seq_len, steps
    kshape = ModelShape(
        layers=sh.layers,
        d_model=sh.d,
        d_ff=sh.f,
        d_kv=sh.kv_heads * sh.head_dim,
        heads=sh.heads,
        vocab=sh.vocab,
        element_bytes=element,
        masked=sh.masked,
        gated=sh.gated,
    )
    clean = kshape.clean_bytes(1, S)
    clean_pass = kshape.clean_pass_bytes(1, S)
    head_row = kshape.head_row_bytes()
    if method in ("ig", "steps1_zero"):
        from knlight.neurons.fast_engine import DEFAULT_CHUNK_ROWS
        from knlight.neurons.head_grad import VOCAB_BLOCK
        from knlight.neurons.memory import default_head_rows, fixed_chunks

        # The fast engine's head holds one vocabulary block of logits per row (knlight/neurons/head_grad.py).
        kshape = dataclasses.replace(kshape, head_width=min(sh.vocab, VOCAB_BLOCK))
        head_row = kshape.head_row_bytes()

        rows = 1 if method == "steps1_zero" else m
        per_block = rows * kshape.row_block_bytes(S) + kshape.unit_block_bytes(S, rows)
        chunks = fixed_chunks(sh.layers, rows, DEFAULT_CHUNK_ROWS[sh.masked])  # the default chunking
        # A masked row's own block keeps only its target's FFN output change (one clean call per sequence).
        own = 1 if sh.masked else 0
        sweep = max(sum(sh.layers - layer - own for layer in range(lo, hi)) * per_block for lo, hi in chunks)
        largest = max(hi - lo for lo, hi in chunks) * rows
        return clean + max(clean_pass, sweep + min(largest, default_head_rows(kshape)) * head_row)
    if method == "joint_ig":
        # The reference clean pass keeps full logits; then m rows through every layer.
        per_block = m * kshape.row_block_bytes(S) + kshape.unit_block_bytes(S, 1)
        # gold_log_probs sums the normaliser in float64: a float64 copy of each row's logits (knlight/neurons/ig.py).
        wide = m * sh.vocab * 8
        return S * sh.vocab * element + sh.layers * per_block + m * head_row + wide
    if method == "grad_x_act":
        if sh.masked:
            return sh.layers * kshape.sequence_block_bytes(S) + head_row
        # Causal: the prefix's keys/values, then one token's forward with gradients over them (each block's
        # attention keeps the concatenated keys/values, as the fast engine's rows do).
        return clean + sh.layers * (kshape.sequence_block_bytes(1) + kshape.unit_block_bytes(S, 1)) + head_row
    if method in ("eleuther", "easyedit", "reference"):
        rows = 1 if method == "easyedit" else m
        return rows * (sh.layers * kshape.sequence_block_bytes(S) + S * head_row)
    raise ValueError(f"unknown method {method!r}")


# -- validation on CPU --------------------------------------------------------------------------------------

VALIDATE = [("gpt2-mini", "gpt2"), ("llama-mini", "llama"), ("bert-mini", "bert")]
QUERY = ("According to the encyclopedia, the capital of France is [Y].", "Paris")


def build(shape_name: str, arch: str):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from knlight import LanguageModel
    from knlight.lm.tiny import TOKENIZER_KIND, tiny_config, tiny_tokenizer

    sh = SHAPES[shape_name]
    extra = dict(num_key_value_heads=sh.kv_heads) if arch == "llama" else {}
    config = tiny_config(arch, sh.vocab, hidden=sh.d, ff=sh.f, layers=sh.layers, heads=sh.heads, **extra)
    config.initializer_range = 0.02
    torch.manual_seed(0)
    auto = AutoModelForMaskedLM if sh.masked else AutoModelForCausalLM
    return LanguageModel(auto.from_config(config).eval(), tiny_tokenizer(TOKENIZER_KIND[arch]))


def count_flops(run) -> float:
    """FLOPs of ``run`` from torch's FLOP formulas (``torch.utils.flop_counter``: matmuls, attention; forward
    and backward), applied in a dispatch mode of its own: FlopCounterMode's module tracker refuses the
    ``autograd.grad`` calls on detached leaves the fast engine makes. CPU attention maps to the flash formulas."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    aten = torch.ops.aten
    registry = dict(flop_registry)
    registry[aten._scaled_dot_product_flash_attention_for_cpu] = flop_registry[
        aten._scaled_dot_product_flash_attention
    ]
    registry[aten._scaled_dot_product_flash_attention_for_cpu_backward] = flop_registry[
        aten._scaled_dot_product_flash_attention_backward
    ]

    class Counter(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            formula = registry.get(func._overloadpacket)
            if formula is not None:
                Counter.total += formula(*args, **(kwargs or {}), out_val=out)
            return out

    with Counter():
        run()
    return float(Counter.total)


def measure(run) -> dict:
    """FLOPs (torch's formulas), peak live tensor bytes (torch's CPU memory profiler) and seconds of ``run``."""
    from torch.profiler import ProfilerActivity, profile

    flops = count_flops(run)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    start = time.perf_counter()
    run()
    return dict(flops=flops, peak_bytes=float(peak), seconds=time.perf_counter() - start)


def runner(method: str, lm, arch: str):
    from knlight import attribute

    query, answer = QUERY
    if method == "eleuther":
        from knowledge_neurons import KnowledgeNeurons

        kn = KnowledgeNeurons(lm.model, lm.tokenizer, model_type=arch, device="cpu")
        lm.model.requires_grad_(True)
        prompt = query.replace("[Y]", "[MASK]") if lm.masked else query.split("[Y]")[0].rstrip()
        target = answer if lm.masked else " " + answer

        def run() -> None:
            kn.get_scores(prompt, target, batch_size=20, steps=20, pbar=False)

        return run
    lm.model.requires_grad_(False)
    return lambda: attribute(lm, query, answer, method=method, steps=20)


def validate() -> list[dict]:
    rows = []
    for shape_name, arch in VALIDATE:
        lm = build(shape_name, arch)
        seq_len = len(lm.encode(*QUERY).input_ids)
        methods = ["ig", "grad_x_act", "steps1_zero", "joint_ig"] + (["eleuther"] if arch != "llama" else [])
        for method in methods:
            got = measure(runner(method, lm, arch))
            sh = SHAPES[shape_name]
            model_flops = method_flops(method, sh, seq_len, 20)
            model_peak = method_peak_bytes(method, sh, seq_len, 20)
            rows.append(
                dict(
                    shape=shape_name,
                    method=method,
                    seq_len=seq_len,
                    measured_gflop=got["flops"] / 1e9,
                    model_gflop=model_flops / 1e9,
                    flop_ratio=model_flops / got["flops"],
                    measured_peak_mb=got["peak_bytes"] / 2**20,
                    model_peak_mb=model_peak / 2**20,
                    peak_ratio=model_peak / got["peak_bytes"],
                    seconds=got["seconds"],
                    gflops_achieved=got["flops"] / 1e9 / got["seconds"],
                )
            )
            r = rows[-1]
            print(
                f"{shape_name:11} {method:12} S={seq_len:3} GFLOP measured {r['measured_gflop']:8.2f} model "
                f"{r['model_gflop']:8.2f} ({r['flop_ratio']:.2f}x)  peak MB measured {r['measured_peak_mb']:7.1f} "
                f"model {r['model_peak_mb']:7.1f} ({r['peak_ratio']:.2f}x)  {r['seconds']:.2f}s",
                flush=True,
            )
    return rows


# -- projection -----------------------------------------------------------------------------------------------

GPU = dict(name="one A100-80GB-class GPU", peak_tflops_bf16=312.0, memory_gb=80.0, bandwidth_tb_s=2.0)
UTILISATION = 0.4
"""Assumed share of the peak every method reaches (the same for all; a stated assumption, not a measurement)."""
PROJECT = [("llama2-7b", 2.0), ("llama3-8b", 2.0), ("qwen2.5-7b", 2.0), ("llama3-70b", 0.5)]
"""Models and bytes per weight: bf16, and 4-bit weights for the 70B model (141 GB in bf16 fits no single GPU;
4-bit loading, e.g. bitsandbytes NF4, is not tested with knlight: this row is a projection only)."""
WEIGHT_PASSES = dict(ig=3, steps1_zero=3, joint_ig=3, grad_x_act=2, eleuther=3, easyedit=3)
"""Reads of all weights per query (per layer for the peers: each layer runs its own forward and backward)."""


def project(seq_lens: tuple[int, ...] = (30, 300), steps: int = 20) -> list[dict]:
    rows = []
    rate = GPU["peak_tflops_bf16"] * 1e12 * UTILISATION
    for name, weight_bytes in PROJECT:
        sh = SHAPES[name]
        weights = sh.weights() * weight_bytes
        for seq_len in seq_lens:
            for method in ("ig", "grad_x_act", "steps1_zero", "joint_ig", "eleuther", "easyedit"):
                flop = method_flops(method, sh, seq_len, steps)
                work = method_peak_bytes(method, sh, seq_len, steps, element=2)  # bf16 activations
                passes = WEIGHT_PASSES[method] * (sh.layers if method in ("eleuther", "easyedit") else 1)
                seconds = max(flop / rate, passes * weights / (GPU["bandwidth_tb_s"] * 1e12))
                total_gb = (weights + work) / 1e9
                rows.append(
                    dict(
                        model=name,
                        weight_bits=int(8 * weight_bytes),
                        seq_len=seq_len,
                        method=method,
                        tflop_per_query=flop / 1e12,
                        s_per_query=seconds,
                        peak_gb=total_gb,
                        fits=total_gb <= GPU["memory_gb"],
                    )
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--validate", action="store_true", help="measure on CPU shapes and compare")
    parser.add_argument("--project", action="store_true", help="project to 7B-70B models on one GPU")
    parser.add_argument("--out", default="benchmarks/results/cost_model.json")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    out: dict = {"meta": dict(torch=torch.__version__, steps=20, dtype_measured="float32", device="cpu")}
    if Path(args.out).exists():
        out.update(json.loads(Path(args.out).read_text()))
    if args.validate:
        out["validation"] = validate()
    if args.project:
        out["projection"] = dict(
            label="PROJECTION, not a measurement: max(FLOPs / (peak x assumed utilisation), weight reads / "
            "bandwidth); memory = weights (bf16; 4-bit for 70B) + the modelled bf16 working set of one query at the "
            "method's default batching (EleutherAI/EasyEdit: batch_size = steps; autograd.grad w.r.t. the "
            "activations, so no parameter .grad buffers)",
            gpu=GPU,
            utilisation=UTILISATION,
            rows=project(),
        )
        for r in out["projection"]["rows"]:
            print(
                f"{r['model']:11} w{r['weight_bits']:<2} S={r['seq_len']:3} {r['method']:12} "
                f"{r['tflop_per_query']:9.2f} TFLOP "
                f"{r['s_per_query']:9.3f} s/query  {r['peak_gb']:7.1f} GB {'fits' if r['fits'] else 'OOM'}"
            )
    from knlight.io import write_text_atomically

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(Path(args.out), json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
