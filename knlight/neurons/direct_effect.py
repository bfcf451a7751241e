"""Direct effects of FFN neurons: what a neuron's own write does to the answer, later layers held clean.

Neuron ``i`` of layer ``l`` writes ``a_i · W_out[:, i]`` into its block's FFN output at each target position.
Its **direct effect** is the change of log P(answer) (summed over the answer tokens, gold prefix
teacher-forced) when that write is removed while every *later sublayer* — each block's attention output and
FFN output from layer ``l + 1`` on (and the other neurons' writes of layer ``l``) — is held at its clean value:
only the residual stream and the norms on it (final norm, post-norms, BERT's post-LN) carry the change to the
head. Positive: the write raises the answer. The *total* effect (IG, suppression) also counts what later layers
compute from the neuron; a neuron upstream of the carriers has a large total and a small direct effect.

Two ways to compute it:

* ``exact`` (:func:`direct_effects`): a patched forward per candidate — every attention-output and FFN-output
  module returns its clean output, the candidate's own layer returns it minus the candidate's write at the
  target positions; ``log P(clean) − log P(patched)``. Batched: the candidates of one query run together.
* ``linear`` (:func:`linear_direct_effects`): the same path linearised at the clean point — one forward in
  which every sublayer output is a constant (FFN outputs are leaves) and one backward give ``g_l = ∂ log P /
  ∂ y_l`` for every layer at once; ``DE_lin[l, i] = Σ_t a_{l,t,i} · (W_out[:, i] · g_{l,t})`` for every neuron
  of the model (direct logit attribution through the final norm and the head, and through any post-norms).

The attention-output module of each architecture is named in :data:`ATTENTION_OUTPUTS`. Pure torch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from knlight.lm.prompts import EncodedQuery
from knlight.lm.sites import get_path, neuron_columns
from knlight.lm.upstream import last_hidden_state
from knlight.neurons.neuron import Neuron, check_neurons

_GATED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
ATTENTION_OUTPUTS: dict[str, str] = {
    "gpt2": "attn.c_proj",
    "bloom": "self_attention.dense",
    **{t: "attention.output.dense" for t in ("bert", "xlm-roberta", "roberta", "camembert")},
    **{t: "self_attn.o_proj" for t in _GATED},
}
"""Per ``model_type``, the module (inside a block) whose output is the attention sublayer's write."""


class DirectEffectError(ValueError):
    """The model's architecture has no known attention-output module."""


def attention_outputs(lm: Any) -> list[nn.Module]:
    """Each block's attention-output module (see :data:`ATTENTION_OUTPUTS`)."""
    model_type = str(getattr(lm.model.config, "model_type", ""))
    path = ATTENTION_OUTPUTS.get(model_type)
    modules = [get_path(block, path) for block in lm.sites.blocks] if path else []
    if not modules or any(m is None for m in modules):
        raise DirectEffectError(
            f"knlight does not know the attention-output module of model_type={model_type!r}; add its path "
            "inside a block to knlight.neurons.direct_effect.ATTENTION_OUTPUTS"
        )
    return modules  # type: ignore[return-value]


class _Clean:
    """One query's clean pass: every block's attention output, FFN output ``y`` and FFN activation ``a``."""

    def __init__(self, lm: Any, query: EncodedQuery) -> None:
        self.attn: list[torch.Tensor] = []
        self.y: list[torch.Tensor] = []
        self.a: list[torch.Tensor] = []
        attn = attention_outputs(lm)
        with ExitStack() as stack, torch.no_grad():
            for layer in range(lm.num_layers):
                stack.enter_context(_record(attn[layer], self.attn))
                stack.enter_context(_record(lm.sites.out_projs[layer], self.y, self.a))
            self.log_prob = _log_prob(lm, query, 1)[0]


@contextmanager
def _record(
    module: nn.Module, outputs: list[torch.Tensor], inputs: list[torch.Tensor] | None = None
) -> Iterator[None]:
    def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        outputs.append(out.detach())
        if inputs is not None:
            inputs.append(args[0].detach())

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def _replace(module: nn.Module, make: Any) -> Iterator[None]:
    handle = module.register_forward_hook(lambda mod, args, out: make(out))
    try:
        yield
    finally:
        handle.remove()


def _log_prob(lm: Any, query: EncodedQuery, rows: int) -> torch.Tensor:
    """``[rows]`` log P(answer) of ``rows`` copies of one query (the hooks decide what each row computes)."""
    device = lm.device
    ids = torch.tensor([query.input_ids], device=device).expand(rows, -1)
    hidden = last_hidden_state(lm.model.base_model(input_ids=ids, attention_mask=torch.ones_like(ids)))
    positions = torch.tensor([p for p, _ in query.targets], device=device)
    tokens = torch.tensor([t for _, t in query.targets], device=device)
    logits = lm.head(hidden[:, positions]).float()  # [rows, T, V]
    gold = torch.log_softmax(logits, -1).gather(-1, tokens.expand(rows, -1)[..., None])[..., 0]
    return gold.sum(-1)


def _columns(lm: Any, layer: int) -> torch.Tensor:
    """``[d_model, d_ff]`` W_out of one layer (column i: what neuron i writes per unit of activation)."""
    return neuron_columns(lm.sites.out_projs[layer], lm.sites.spec.conv1d)


@torch.no_grad()
def direct_effects(
    lm: Any, items: Sequence[EncodedQuery], neurons: Sequence[Neuron], chunk_rows: int = 64
) -> torch.Tensor:
    """Exact direct effects (patched forwards) of ``neurons`` on each item: how *necessary* each write is.

    Args:
        lm: A :class:`knlight.LanguageModel`.
        items: Encoded queries.
        neurons: Candidate ``(layer, index)`` neurons.
        chunk_rows: Patched rows (candidates) per forward.

    Returns:
        ``[len(items), len(neurons)]`` log P(clean) − log P(write removed), in nats.
    """
    return _patched_effects(lm, items, neurons, chunk_rows, sufficiency=False)


@torch.no_grad()
def sufficiency_effects(
    lm: Any, items: Sequence[EncodedQuery], neurons: Sequence[Neuron], chunk_rows: int = 64
) -> torch.Tensor:
    """How *sufficient* each neuron's write is: its write alone over the state without any of ``neurons``.

    The base row removes the writes of all ``neurons`` at the target positions (later sublayers clean, as in
    :func:`direct_effects`); each candidate's row puts its own write back. A member of a redundant pair has a
    small direct effect (the other member still writes the answer) and a large sufficiency.

    Returns:
        ``[len(items), len(neurons)]`` log P(only this write kept) − log P(all removed), in nats.
    """
    return _patched_effects(lm, items, neurons, chunk_rows, sufficiency=True)


def _patched_effects(
    lm: Any, items: Sequence[EncodedQuery], neurons: Sequence[Neuron], chunk_rows: int, sufficiency: bool
) -> torch.Tensor:
    neurons = [(int(a), int(b)) for a, b in neurons]
    check_neurons(neurons, lm.num_layers, lm.d_ff)
    out = torch.zeros(len(items), len(neurons))
    if not neurons:
        return out
    attn_modules = attention_outputs(lm)
    for q, query in enumerate(items):
        clean = _Clean(lm, query)
        positions = torch.tensor([p for p, _ in query.targets])

        # Each candidate's write ``a_i · W_out[:, i]`` at the targets, computed once per query.
        cols = {layer: _columns(lm, layer) for layer in {layer for layer, _ in neurons}}
        writes = {
            (layer, index): clean.a[layer][0, positions, index, None]
            * cols[layer][:, index].to(clean.y[layer].dtype)
            for layer, index in dict.fromkeys(neurons)
        }
        # Per layer the FFN output every row starts from: clean, or (sufficiency) without any candidate's write.
        base = [clean.y[layer][0].clone() for layer in range(lm.num_layers)]
        if sufficiency:
            for (layer, _), write in writes.items():
                base[layer][positions] -= write
        for start in range(0, len(neurons), chunk_rows):
            chunk = neurons[start : start + chunk_rows]
            rows = len(chunk) + 1  # row 0: the base; row r: candidate r's write removed (or kept alone)
            with ExitStack() as stack:
                for layer in range(lm.num_layers):
                    attn = clean.attn[layer]
                    stack.enter_context(
                        _replace(
                            attn_modules[layer], lambda out, attn=attn, rows=rows: attn.expand(rows, -1, -1)
                        )
                    )
                    patched = base[layer].expand(rows, -1, -1).clone()
                    for r, (l_n, i_n) in enumerate(chunk, start=1):
                        if l_n == layer:
                            write = writes[(l_n, i_n)]
                            patched[r, positions] += write if sufficiency else -write
                    stack.enter_context(_replace(lm.sites.out_projs[layer], lambda out, y=patched: y))
                log_p = _log_prob(lm, query, rows)
            gain = log_p[1:] - log_p[0] if sufficiency else log_p[0] - log_p[1:]
            out[q, start : start + len(chunk)] = gain.float().cpu()
    return out


def direct_path_grads(lm: Any, query: EncodedQuery) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per layer, ``∂ log P / ∂ y_l`` at the query's target positions with every sublayer output held constant.

    Returns:
        Per layer the ``[T, d_model]`` gradient (the direction a write to the FFN output moves the answer along
        the residual stream and its norms only) and the ``[T, d_ff]`` FFN activations at the targets.
    """
    attn_modules = attention_outputs(lm)
    leaves: list[torch.Tensor] = []
    acts: list[torch.Tensor] = []

    def leaf(out: torch.Tensor) -> torch.Tensor:
        leaves.append(out.detach().requires_grad_(True))
        return leaves[-1]

    with ExitStack() as stack, torch.enable_grad():
        for layer in range(lm.num_layers):
            stack.enter_context(_replace(attn_modules[layer], lambda out: out.detach()))
            stack.enter_context(_record(lm.sites.out_projs[layer], [], acts))
            stack.enter_context(_replace(lm.sites.out_projs[layer], leaf))
        log_p = _log_prob(lm, query, 1)[0]
        grads = torch.autograd.grad(log_p, leaves)
    positions = torch.tensor([p for p, _ in query.targets])
    return [g[0, positions].float() for g in grads], [a[0, positions].float() for a in acts]


def linear_direct_effects(lm: Any, query: EncodedQuery) -> torch.Tensor:
    """Linearised direct effects of every neuron of the model on one query.

    Returns:
        ``[num_layers, d_ff]`` ``Σ_t a_{l,t,i} · W_out[:, i] · ∂ log P / ∂ y_{l,t}`` with every sublayer output
        held constant (the gradient flows through the residual stream and its norms only), in nats.
    """
    grads, acts = direct_path_grads(lm, query)
    # Per neuron W_out[:, i] · g_t, weighted by its activation a_t and summed over the targets.
    rows = [
        (acts[layer] * (grads[layer] @ _columns(lm, layer).float())).sum(0) for layer in range(lm.num_layers)
    ]
    return torch.stack(rows).cpu()


def direct_effects_of(
    lm: Any,
    items: Sequence[EncodedQuery],
    neurons: Sequence[Neuron],
    method: str = "exact",
    chunk_rows: int = 64,
) -> torch.Tensor:
    """``[len(items), len(neurons)]`` direct effects by ``method`` (``exact`` or ``linear``)."""
    if method == "exact":
        return direct_effects(lm, items, neurons, chunk_rows)
    if method != "linear":
        raise ValueError(f"unknown direct-effect method {method!r}; choose exact or linear")
    neurons = [(int(a), int(b)) for a, b in neurons]
    check_neurons(neurons, lm.num_layers, lm.d_ff)
    index = torch.tensor(neurons, dtype=torch.long).view(-1, 2)
    out = torch.zeros(len(items), len(neurons))
    for q, query in enumerate(items):
        full = linear_direct_effects(lm, query)
        out[q] = full[index[:, 0], index[:, 1]]
    return out
