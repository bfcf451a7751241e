"""Memory planning for the fast IG engine: ``chunk_rows: auto`` from a budget (``max_memory_gb``).

The fast engine's peak memory is what its sweep keeps for the backward pass, and that is easy to count:

* each *row* (one problem at one quadrature node) keeps, in every block it traverses, a few ``d_model``- and
  ``d_ff``-wide activations (one token for causal LMs, the whole sequence for masked LMs);
* each causal *unit* (the m rows of one problem) keeps its copy of the clean keys/values and its mask rows;
* the LM head keeps ``[head_rows, vocab]`` logits, softmax and their gradients (fp32) for one sub-chunk, or with a
  plain linear output embedding only ``[head_rows, block]`` of them (:mod:`knlight.neurons.head_grad`);
* the clean pass keeps, for every layer, the block inputs and (causal) keys/values of the batch (and needs every
  layer's activations while it runs, before the sweep).

Problems are sorted by layer, so the planner walks them in that order and closes a chunk when the next problem
would cross the budget (a row entering at layer l costs L - l blocks). The per-activation counts below are
upper bounds of what was measured with torch's CPU memory profiler on GPT-2, Llama, Gemma 3 and BERT blocks
(``tests/test_memory_plan.py`` checks the measured peak stays under the budget; the plan overestimates by
~1.3-1.6× on those blocks). Pure torch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from knlight.errors import ConfigError
from knlight.neurons.head_grad import VOCAB_BLOCK, output_linear

SAFETY = 0.8
"""Share of the budget the plan fills (allocator slack, Python temporaries)."""
CAUSAL_D, CAUSAL_F = 8.0, 5.0
"""Saved activations per causal row and block, in ``d_model``- and ``d_ff``-wide vectors (measured: GPT-2
5.5 and 4.0, Llama 4 and 3)."""
GATED_D, GATED_F = 6.0, 3.5
"""The same for causal rows of gated (SwiGLU/GeGLU) FFNs (measured on Llama: 4 and 3)."""
MASKED_D, MASKED_F = 6.0, 1.0
"""The same per token of a masked row (measured on BERT: 6 and 1)."""
HEAD_V = 2
"""fp32 ``vocab``-wide vectors per head row beyond the logits themselves (log-softmax, its gradient; measured)."""
DEFAULT_HEAD_BYTES = 256 << 20
"""Head sub-chunk size when no budget is given: the logits of one sub-chunk stay within ~256 MB."""


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs to know of a model.

    Attributes:
        layers: Number of blocks.
        d_model: Residual width.
        d_ff: FFN width (the attributed activations).
        d_kv: Width of one token's keys (heads × head size of the key/value projection).
        heads: Attention heads.
        vocab: Rows of the LM head.
        element_bytes: Bytes per parameter/activation element (4 fp32, 2 bf16/fp16).
        masked: Masked LM (rows are whole sequences) or causal (rows are single tokens).
        gated: The FFN is gated (a ``gate_proj``: Llama, Qwen, Gemma).
        head_width: Logits the head holds per row at once: ``vocab``, or the vocabulary block of the blocked
            head gradient (:mod:`knlight.neurons.head_grad`) when the output embedding is a plain linear.
    """

    layers: int
    d_model: int
    d_ff: int
    d_kv: int
    heads: int
    vocab: int
    element_bytes: int
    masked: bool
    gated: bool = False
    head_width: int = 0

    @classmethod
    def of(cls, lm: Any) -> ModelShape:
        """The shape of a :class:`knlight.LanguageModel`."""
        config = lm.model.config
        d_model = int(lm.model.get_input_embeddings().weight.shape[1])
        heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None) or 1)
        head_dim = int(getattr(config, "head_dim", None) or d_model // heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        out = lm.model.get_output_embeddings()
        vocab = int(getattr(out, "out_features", None) or config.vocab_size)
        dtype = next(lm.model.parameters()).dtype
        return cls(
            layers=lm.num_layers,
            d_model=d_model,
            d_ff=lm.d_ff,
            d_kv=kv_heads * head_dim,
            heads=heads,
            vocab=vocab,
            element_bytes=torch.empty(0, dtype=dtype).element_size(),
            masked=bool(lm.masked),
            gated=any("gate" in name for name, _ in lm.sites.blocks[0].named_modules()),
            head_width=min(vocab, VOCAB_BLOCK) if output_linear(lm) is not None else vocab,
        )

    def row_block_bytes(self, seq_len: int) -> int:
        """Bytes one row keeps per block it traverses (one token, or ``seq_len`` tokens for masked LMs)."""
        return self.sequence_block_bytes(1) if not self.masked else self.sequence_block_bytes(seq_len)

    def sequence_block_bytes(self, seq_len: int) -> int:
        """Bytes a whole sequence of ``seq_len`` tokens keeps per block (an ordinary forward with gradients)."""
        d, f = (
            (MASKED_D, MASKED_F)
            if self.masked
            else (GATED_D, GATED_F)
            if self.gated
            else (CAUSAL_D, CAUSAL_F)
        )
        per_token = (d * self.d_model + f * self.d_ff) * self.element_bytes
        attention = (
            self.heads * seq_len * seq_len * 4 if seq_len > 1 else 0
        )  # eager attention's probabilities
        return int(seq_len * per_token + attention)

    def unit_block_bytes(self, seq_len: int, group: int) -> int:
        """Bytes a causal unit of ``group`` rows keeps per block: its keys/values (clean + own, the
        concatenation attention saves) and its mask rows."""
        if self.masked:
            return 0
        keys = 2 * (seq_len + group) * self.d_kv * self.element_bytes
        mask = self.heads * group * (seq_len + group) * 4
        return keys + mask

    def head_row_bytes(self) -> int:
        """Bytes one row of an LM-head sub-chunk needs (fp32 logits and their gradients, the row's sums)."""
        width = self.head_width or self.vocab
        return HEAD_V * width * 4 + width * self.element_bytes + 4 * self.d_model * 4

    def clean_bytes(self, batch: int, seq_len: int) -> int:
        """Bytes the clean pass keeps for the sweep: per layer the block inputs and (causal) keys/values."""
        per_token_layer = self.d_model + (0 if self.masked else 2 * self.d_kv)
        return batch * seq_len * self.layers * per_token_layer * self.element_bytes

    def clean_pass_bytes(self, batch: int, seq_len: int) -> int:
        """Bytes the clean pass itself needs on top (every layer's activations, one block's temporaries)."""
        tokens = batch * seq_len
        return tokens * (self.layers * self.d_ff + 4 * self.d_model + 2 * self.d_ff) * self.element_bytes


def available_bytes(device: torch.device | str) -> int:
    """What the device has free now: CUDA's free memory, or the system's available RAM."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def budget_bytes(
    max_memory_gb: float | None, device: torch.device | str, key: str = "ig.max_memory_gb"
) -> int:
    """The budget in bytes: ``max_memory_gb`` GiB, or 90 % of what the device has free (``key`` names the
    setting in errors)."""
    if max_memory_gb is None:
        return int(0.9 * available_bytes(device))
    check_budget(max_memory_gb, key)
    return int(max_memory_gb * (1 << 30))


def check_budget(max_memory_gb: object, key: str) -> None:
    """Raises ConfigError unless ``max_memory_gb`` (the setting ``key``) is a positive number of GiB."""
    if isinstance(max_memory_gb, bool) or not isinstance(max_memory_gb, int | float) or max_memory_gb <= 0:
        raise ConfigError(f"{key}={max_memory_gb!r}: give a positive number of GiB, or null")


@dataclass(frozen=True)
class SweepPlan:
    """How one ``integrate`` call is cut: problem ranges (in layer order) and the head sub-chunk.

    Attributes:
        chunks: ``(start, stop)`` ranges over the problems sorted by layer.
        head_rows: Rows per LM-head sub-chunk.
        planned_bytes: The largest planned peak of a chunk (clean state included).
    """

    chunks: list[tuple[int, int]]
    head_rows: int
    planned_bytes: int


def default_head_rows(shape: ModelShape) -> int:
    """Head sub-chunk rows without a budget: logits within :data:`DEFAULT_HEAD_BYTES`."""
    return max(8, DEFAULT_HEAD_BYTES // (16 * (shape.head_width or shape.vocab)))


def plan_sweep(
    shape: ModelShape,
    sorted_layers: list[int],
    rows_per_problem: int,
    seq_len: int,
    batch: int,
    budget: int,
    grouped: bool = True,
) -> SweepPlan:
    """Cut problems (sorted by layer) into chunks whose planned peak stays within ``SAFETY × budget``.

    Args:
        shape: The model's shape.
        sorted_layers: The layer of each problem, ascending.
        rows_per_problem: Quadrature nodes per problem (m, plus the α=0 row when it is evaluated).
        seq_len: Longest sequence of the batch.
        batch: Sequences in the clean pass.
        budget: Bytes the attribution may use.
        grouped: Causal rows of a problem share one unit (one copy of the clean keys/values).

    Raises:
        ConfigError: When the budget cannot hold the clean state, one head row and one problem.
    """
    m = rows_per_problem
    clean = shape.clean_bytes(batch, seq_len)
    usable = int(SAFETY * budget) - clean
    head_rows = max(1, min(default_head_rows(shape), (usable // 4) // shape.head_row_bytes()))
    head = head_rows * shape.head_row_bytes()
    units = 1 if grouped else m
    row = shape.row_block_bytes(seq_len)
    unit = shape.unit_block_bytes(seq_len, m if grouped else 1)
    per_block = m * row + units * unit  # one problem, one block
    # Gradients w.r.t. the path, the path itself and the final states: a few d_ff/d_model vectors per row.
    per_problem_extra = m * (4 * shape.d_ff + 4 * shape.d_model) * 4
    chunks: list[tuple[int, int]] = []
    start, used, peak = 0, 0, 0
    for p, layer in enumerate(sorted_layers):
        cost = (shape.layers - layer) * per_block + per_problem_extra
        if p > start and used + cost + head > usable:
            chunks.append((start, p))
            peak = max(peak, used)
            start, used = p, 0
        used += cost
    if sorted_layers:
        chunks.append((start, len(sorted_layers)))
        peak = max(peak, used)
    need = (shape.layers - min(sorted_layers, default=0)) * per_block + per_problem_extra + head
    need = max(need, shape.clean_pass_bytes(batch, seq_len))
    if need > usable:
        gib = (need + clean) / SAFETY / (1 << 30)
        raise ConfigError(
            f"ig.max_memory_gb={budget / (1 << 30):.3g}: one IG problem of this model ({shape.layers} layers, "
            f"d_ff {shape.d_ff}, vocab {shape.vocab}, {m} rows, {seq_len} tokens) needs about {gib:.3g} GiB; "
            "raise ig.max_memory_gb, lower ig.steps, or attribute fewer queries per batch"
        )
    planned = clean + max(peak + head, shape.clean_pass_bytes(batch, seq_len))
    return SweepPlan(chunks=chunks, head_rows=head_rows, planned_bytes=planned)


def fixed_chunks(n_problems: int, rows_per_problem: int, chunk_rows: int) -> list[tuple[int, int]]:
    """Chunks of ``chunk_rows // rows_per_problem`` problems (at least one) for a fixed ``chunk_rows``."""
    per_chunk = max(1, chunk_rows // rows_per_problem)
    return [(s, min(s + per_chunk, n_problems)) for s in range(0, n_problems, per_chunk)]


ChunkRows = int | str
"""A row-chunking setting: a positive number of rows per forward, or ``"auto"`` (planned from a budget)."""


def check_chunk_rows(chunk_rows: object, max_memory_gb: object, key: str, allow_none: bool = False) -> None:
    """Check a ``chunk_rows`` / ``max_memory_gb`` pair of settings (``<key>.chunk_rows``, ...).

    Raises:
        ConfigError: ``chunk_rows`` is not a positive number or ``auto`` (or null where ``allow_none``), or
            ``max_memory_gb`` is not a positive number or null, or is given without ``chunk_rows: auto``.
    """
    ok = chunk_rows == "auto" or (allow_none and chunk_rows is None)
    if not ok and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        default = ", or null for the default" if allow_none else ""
        raise ConfigError(
            f"{key}.chunk_rows={chunk_rows!r}: give a positive number, auto (planned from {key}.max_memory_gb)"
            f"{default}"
        )
    if max_memory_gb is None:
        return
    check_budget(max_memory_gb, f"{key}.max_memory_gb")
    if chunk_rows != "auto":
        raise ConfigError(
            f"{key}.max_memory_gb={max_memory_gb} is the budget of {key}.chunk_rows=auto, but "
            f"{key}.chunk_rows={chunk_rows!r}: set {key}.chunk_rows=auto, or drop {key}.max_memory_gb"
        )


def inference_row_bytes(shape: ModelShape, seq_len: int, targets: int) -> int:
    """Bytes one sequence of ``seq_len`` tokens needs in a forward without gradients: one block's
    temporaries at a time, every layer's keys/values (the cache a causal forward builds), the attention
    probabilities of one layer, and fp32 logits (+ log-softmax) at its ``targets`` positions."""
    per_token = (4 * shape.d_model + 3 * shape.d_ff) * shape.element_bytes
    keys = 0 if shape.masked else 2 * shape.layers * shape.d_kv * shape.element_bytes
    attention = shape.heads * seq_len * seq_len * 4
    return seq_len * (per_token + keys) + attention + targets * shape.vocab * (2 * 4 + shape.element_bytes)


def resolve_chunk_rows(
    lm: Any,
    chunk_rows: ChunkRows,
    seq_len: int,
    targets: int,
    max_memory_gb: float | None,
    key: str = "model.init_args",
) -> int:
    """Rows per forward of an inference task (interventions, edit scoring, the DKN search).

    Args:
        lm: A :class:`knlight.LanguageModel`.
        chunk_rows: A positive number (returned as is), or ``"auto"``: as many rows as fit in
            ``SAFETY × budget`` by :func:`inference_row_bytes` of the longest row.
        seq_len: Longest sequence of the rows.
        targets: Most target positions of a row.
        max_memory_gb: The budget in GiB (None: 90 % of what the device has free).
        key: Where the two settings live, named in errors (``<key>.chunk_rows``, ``<key>.max_memory_gb``).

    Raises:
        ConfigError: ``chunk_rows`` is neither a positive number nor ``auto``, or one row does not fit.
    """
    check_chunk_rows(chunk_rows, max_memory_gb if chunk_rows == "auto" else None, key)
    if isinstance(chunk_rows, int):
        return chunk_rows
    budget = budget_bytes(max_memory_gb, lm.device, f"{key}.max_memory_gb")
    row = inference_row_bytes(ModelShape.of(lm), seq_len, targets)
    rows = int(SAFETY * budget) // row
    if rows < 1:
        raise ConfigError(
            f"{key}.chunk_rows=auto with {key}.max_memory_gb={budget / (1 << 30):.3g}: one row of {seq_len} "
            f"tokens needs about {row / SAFETY / (1 << 30):.3g} GiB; raise {key}.max_memory_gb"
        )
    return rows
