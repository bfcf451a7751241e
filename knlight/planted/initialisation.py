"""The starting point of train-to-plant, written into the random model's weights before training.

W_in rows come from a logistic probe that separates each planted neuron's *on* states (the FFN input at the
target position of its own queries) from every other state, scaled so that the neuron fires there (gated MLPs:
the up row along the mean *on* state); carriers' W_out columns point along their object's output embedding
(or, when the head transforms before it, along the direct-path gradient of log P(object): ``carrier_direction``),
distractors' along a random direction orthogonal to every carrier's, all with the norm of an ordinary column.
Pure torch, no Lightning.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from knlight.lm.sites import neuron_columns, neuron_rows
from knlight.neurons.direct_effect import direct_path_grads
from knlight.planted.build import Planter


def _fit_probe(
    x: torch.Tensor, y: torch.Tensor, bias: bool, steps: int = 150
) -> tuple[torch.Tensor, torch.Tensor]:
    """Class-balanced logistic regression per neuron: ``x`` [N, d], ``y`` [n, N] bool -> w [n, d], b [n]."""
    with torch.enable_grad():
        return _fit_probe_impl(x, y, bias, steps)


def _fit_probe_impl(
    x: torch.Tensor, y: torch.Tensor, bias: bool, steps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = y.shape[0], x.shape[1]
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    xs = (x - mu) / sd
    w = torch.zeros(n, d, requires_grad=True)
    b = torch.zeros(n, requires_grad=True)
    opt = torch.optim.Adam([w, b] if bias else [w], lr=0.1)
    yf = y.float()
    pos_w = 0.5 / yf.sum(1, keepdim=True).clamp_min(1)
    neg_w = 0.5 / (1 - yf).sum(1, keepdim=True).clamp_min(1)
    weight = yf * pos_w + (1 - yf) * neg_w
    for _ in range(steps):
        opt.zero_grad()
        z = w @ xs.T + b[:, None] if bias else w @ ((x) / sd).T
        loss = (
            (weight * nn.functional.binary_cross_entropy_with_logits(z, yf, reduction="none")).sum(1).mean()
        )
        (loss + 1e-3 * (w**2).sum(1).mean()).backward()
        opt.step()
    with torch.no_grad():
        w_raw = w / sd  # back to the raw input scale
        b_raw = b - (w_raw * mu).sum(1) if bias else torch.zeros(n)
    return w_raw.detach(), b_raw.detach()


@torch.no_grad()
def _ffn_inputs(planter: Planter) -> dict[int, torch.Tensor]:
    """The FFN input of every planted layer over the training batch."""
    store: dict[int, torch.Tensor] = {}
    handles = []
    for layer in planter.layers:
        module = planter.sites.in_projs[layer][0]

        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], layer: int = layer) -> None:
            store[layer] = args[0].detach()

        handles.append(module.register_forward_pre_hook(hook))
    try:
        planter.model(input_ids=planter.batch.ids, attention_mask=planter.batch.attention)
    finally:
        for h in handles:
            h.remove()
    return store


def carrier_direction_mode(planter: Planter) -> str:
    """The resolved :attr:`PlantConfig.carrier_direction` (``auto``: by whether the head has a transform)."""
    mode = planter.config.carrier_direction
    if mode == "auto":
        plain = planter.sites.head is planter.model.get_output_embeddings()
        return "embedding" if plain else "head_gradient"
    if mode not in ("embedding", "head_gradient"):
        raise ValueError(f"carrier_direction must be auto, embedding or head_gradient, not {mode!r}")
    return mode


def _orthonormal(vectors: torch.Tensor) -> torch.Tensor:
    """``[d, r]`` orthonormal basis of the span of ``vectors`` ``[n, d]``."""
    u, s, _ = torch.linalg.svd(vectors.T, full_matrices=False)
    return u[:, s > s.max() * 1e-5]


def _output_directions(planter: Planter) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Per carrier (position in ``planter.neurons``) its float32 starting direction, and the ``[d, r]``
    orthonormal basis distractors start orthogonal to."""
    emb = planter.model.get_output_embeddings().weight.detach()  # type: ignore[union-attr]
    carriers = [k for k, n in enumerate(planter.neurons) if n.carrier]
    if carrier_direction_mode(planter) == "embedding":
        obj_of = {r["uuid"]: planter.tokenizer.convert_tokens_to_ids(r["object"]) for r in planter.records}
        objects = sorted({r["object"] for r in planter.records})
        obj_ids = torch.tensor(planter.tokenizer.convert_tokens_to_ids(objects))
        q, _ = torch.linalg.qr(emb[obj_ids].T.float())  # orthonormal basis of the objects' output embeddings
        return {k: emb[obj_of[planter.neurons[k].uuid]].float() for k in carriers}, q
    # head_gradient: per query row and layer, the direct-path gradient of log P(object) w.r.t. the FFN output.
    b = planter.batch
    grads = [direct_path_grads(planter.lm, item)[0] for item in b.encoded]  # [row][layer] -> [T, d]
    directions = {}
    for k in carriers:
        n = planter.neurons[k]
        rows = [r for r, (uuid, lang) in enumerate(b.query_key) if uuid == n.uuid and lang in n.languages]
        directions[k] = torch.stack([grads[r][n.layer].sum(0) for r in rows]).mean(0)
    return directions, _orthonormal(torch.stack(list(directions.values())))


@torch.no_grad()
def initialise(planter: Planter) -> None:
    """W_in from a probe (fires at its own targets); W_out along the object (carriers) or orthogonal.

    Writes the planted neurons' slices of ``planter.model`` (every other weight keeps its random value).
    """
    cfg = planter.config
    valid = planter.batch.attention.bool()
    inputs = _ffn_inputs(planter)
    carrier_directions, q = _output_directions(planter)
    gen = torch.Generator().manual_seed(cfg.seed + 17)
    conv1d = planter.sites.spec.conv1d
    for layer, members in planter.by_layer.items():
        ins, out = planter.sites.in_projs[layer], planter.sites.out_projs[layer]
        x = inputs[layer][valid]  # [N, d]
        y = planter.on_mask[members][:, valid]  # [n, N]
        has_bias = getattr(ins[0], "bias", None) is not None
        w, b = _fit_probe(x, y, bias=has_bias)
        # Break the symmetry between neurons with the same "on" set (same fact and languages).
        w = w + 0.2 * w.norm(dim=1, keepdim=True) * torch.randn(w.shape, generator=gen) / math.sqrt(
            w.shape[1]
        )
        z = w @ x.T + b[:, None]
        for j, k in enumerate(members):
            neuron = planter.neurons[k]
            zp = z[j][y[j]]
            # Scale so the neuron fires clearly where it should (bounded: a poor probe must not explode).
            scale = (cfg.pre_on * 1.5 / zp.median()).clamp(0.25, 4.0) if zp.numel() else torch.tensor(1.0)
            neuron_rows(ins[0], conv1d)[neuron.index] = w[j] * scale
            if has_bias:
                ins[0].bias[neuron.index] = b[j] * scale  # type: ignore[index, union-attr, operator]
            if len(ins) > 1:  # gated: up row along the mean "on" state, so that up > 0 where it fires
                mean_on = x[y[j]].mean(0)
                neuron_rows(ins[1], conv1d)[neuron.index] = (
                    mean_on
                    / mean_on.norm().clamp_min(1e-6)
                    / (x[y[j]] @ (mean_on / mean_on.norm().clamp_min(1e-6))).mean().clamp_min(1e-3)
                )
                if getattr(ins[1], "bias", None) is not None:
                    ins[1].bias[neuron.index] = 0.0  # type: ignore[index, union-attr, operator]
        cols = neuron_columns(out, conv1d)
        typical = cols.norm(dim=0).median()
        for k in members:
            neuron = planter.neurons[k]
            if neuron.carrier:
                direction = carrier_directions[k]
            else:
                direction = torch.randn(cols.shape[0], generator=gen)
                direction = direction - q @ (q.T @ direction)
            cols[:, neuron.index] = direction / direction.norm().clamp_min(1e-6) * typical
