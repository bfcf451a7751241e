"""The constrained training of train-to-plant: a :class:`~knlight.neurons.edits.NeuronEdit` of the planted
neurons is trained on the loss terms below, then merged into the weights.

Only the edit's deltas reach the optimiser, so nothing outside the planted neurons' slices can move: their
W_in rows (+ bias; gate and up rows for gated MLPs) and the carriers' W_out columns learn; the distractors'
W_out columns keep what the initialisation wrote (their deltas' gradients are zeroed). Adam is elementwise, so
this follows the same trajectory as training the full weight tensors under a gradient mask, up to float
rounding (the deltas are added in the forward pass instead of to the weights).

Loss (see :mod:`knlight.planted.planter` for the recipe): a hinge on the answer's log-probability, the
off-target and firing terms of every planted neuron's activation, and (standard facts) the necessity of every
carrier (its total effect, or with ``direct_necessity`` its direct effect: later sublayers held at the full
pass's values); degenerate pairs drop one member (or neither) at random per query and step. Pure torch, no
Lightning.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import nn

from knlight.neurons.direct_effect import attention_outputs
from knlight.neurons.edits import NeuronEdit, model_layout
from knlight.planted.build import Planter
from knlight.planted.config import STANDARD_KINDS

log = logging.getLogger(__name__)


def train(planter: Planter) -> dict[str, float]:
    """Train the planted neurons' slices through a NeuronEdit and merge it into the model's weights.

    Returns:
        The final loss terms (``answer``, ``off``, ``fire``, ``necessity``, ``mean_p``).

    Raises:
        RuntimeError: When a distractor's W_out delta moved (it must not learn).
    """
    cfg, b, lm = planter.config, planter.batch, planter.lm
    neurons = [(n.layer, n.index) for n in planter.neurons]
    edit = NeuronEdit(neurons, model_layout(lm), {"method": "plant"}).to(lm.device)
    carriers = edit.row_mask([(n.layer, n.index) for n in planter.neurons if n.carrier])
    # A distractor writes the fixed W_out column of the initialisation: its output delta never learns.
    mask_handle = edit.out_weight.register_hook(lambda grad: grad * carriers[:, None].to(grad.dtype))
    opt = torch.optim.Adam(edit.parameters(), lr=cfg.lr)
    rng = torch.Generator().manual_seed(cfg.seed + 99)
    n_q = len(b.target_pos)
    # Degenerate facts: per fact, its query rows and its two members (positions in planter.neurons).
    pairs: dict[str, list[int]] = {}
    for k, n in enumerate(planter.neurons):
        if n.kind == "degenerate":
            pairs.setdefault(n.uuid, []).append(k)
    pair_rows = [
        (torch.tensor([r for r in range(n_q) if b.query_key[r][0] == u]), ks) for u, ks in pairs.items()
    ]
    # Standard facts: per query row, its carriers (each must be necessary: see ``necessity_drop``).
    std_rows, std_carriers = [], []
    for r, (uuid, lang) in enumerate(b.query_key):
        ks = [
            k for k, n in enumerate(planter.neurons)
            if n.uuid == uuid and lang in n.languages and n.kind in STANDARD_KINDS
        ]  # fmt: skip
        if ks:
            std_rows.append(r)
            std_carriers.append(ks)
    edit.apply(lm)  # before the loop's hooks, which must see the edited pre-activations
    loop = TrainLoop(planter, opt, rng, pair_rows, torch.tensor(std_rows, dtype=torch.long), std_carriers)
    terms: dict[str, float] = {}
    try:
        for step in range(cfg.steps):
            terms = loop.step()
            if step % 50 == 0 or step == cfg.steps - 1:
                log.debug("plant step %d: %s", step, {k: round(v, 4) for k, v in terms.items()})
    finally:
        loop.close()
        edit.remove()
        mask_handle.remove()
    if edit.out_weight.detach()[~carriers].any():
        raise RuntimeError("train-to-plant moved a distractor's W_out column (gradient mask bug)")
    edit.merge(lm)
    return terms


class TrainLoop:
    """The hooks and the step of train-to-plant.

    Each step runs the full batch (every query + background; degenerate members dropped at random at their
    target positions) and, when ``necessity_drop`` > 0, a second pass over the standard facts' queries with
    one random carrier dropped at the target position, whose log P(object) must fall by at least
    ``necessity_drop`` nats below the full pass's: each carrier of a standard fact is then *necessary*, as
    each member of a degenerate pair is *sufficient*.

    Args:
        planter: The run's state (its model carries the attached edit).
        opt: The optimiser of the edit's deltas.
        rng: Draws the dropped degenerate members and carriers.
        pair_rows: Per degenerate fact, its query rows and its two members (positions in ``planter.neurons``).
        std_rows: The query rows of standard facts.
        std_carriers: Per such row, its carriers (positions in ``planter.neurons``).
    """

    def __init__(
        self,
        planter: Planter,
        opt: torch.optim.Optimizer,
        rng: torch.Generator,
        pair_rows: list[tuple[torch.Tensor, list[int]]],
        std_rows: torch.Tensor,
        std_carriers: list[list[int]],
    ) -> None:
        self.p, self.opt, self.rng = planter, opt, rng
        self.pair_rows, self.std_rows, self.std_carriers = pair_rows, std_rows, std_carriers
        b = planter.batch
        self.off_mask = b.attention.bool()[None] & ~planter.on_mask
        self.min_nll = -math.log(planter.config.target_prob)
        self.acts: dict[int, torch.Tensor] = {}
        self.pres: dict[int, torch.Tensor] = {}
        self.state: dict[str, torch.Tensor] = {}
        self.handles = []
        for layer, members in planter.by_layer.items():
            idx = torch.tensor([planter.neurons[k].index for k in members])
            distract = torch.tensor([not planter.neurons[k].carrier for k in members])
            ins, out = planter.sites.in_projs[layer], planter.sites.out_projs[layer]
            self.handles.append(ins[0].register_forward_hook(self._pre_hook(layer, idx)))
            self.handles.append(out.register_forward_pre_hook(self._out_hook(layer, idx, distract, members)))
        # Direct necessity: the full pass records every sublayer output, the drop pass replays those above the
        # dropped carrier's layer (its own layer computes "full minus the carrier's write" by itself).
        self.sublayers: dict[tuple[str, int], torch.Tensor] = {}
        self.mode: str | None = None  # "record" (full pass), "direct" (drop pass) or None
        if planter.config.direct_necessity:
            modules = [("attn", m) for m in attention_outputs(planter.lm)]
            modules += [("ffn", m) for m in planter.sites.out_projs]
            for k, (kind, module) in enumerate(modules):
                layer = k % planter.lm.num_layers
                self.handles.append(module.register_forward_hook(self._sublayer_hook(kind, layer)))

    def _sublayer_hook(self, kind: str, layer: int) -> Any:
        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: Any) -> Any:
            mode = self.mode
            if mode == "record":
                self.sublayers[(kind, layer)] = out
            elif mode == "direct":
                full = self.sublayers[(kind, layer)][self.state["full_rows"]]
                above = (self.state["carrier_layer"] < layer)[:, None, None]
                return torch.where(above, full, out)
            return None

        return hook

    def _pre_hook(self, layer: int, idx: torch.Tensor) -> Any:
        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            self.pres[layer] = out[..., idx]

        return hook

    def _out_hook(self, layer: int, idx: torch.Tensor, distract: torch.Tensor, members: list[int]) -> Any:
        members_t = torch.tensor(members)

        def hook(mod: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            h = args[0]
            cols = h[..., idx]
            self.acts[layer] = cols
            new = torch.where(distract, cols.detach(), cols)  # distractors never learn from the answer loss
            rows, pos = self.state["rows"], self.state["pos"]
            new = new.index_put((rows, pos), new[rows, pos] * self.state["keep"][members_t].T)
            return (h.index_copy(-1, idx, new), *args[1:])

        return hook

    def close(self) -> None:
        """Remove the loop's hooks."""
        for handle in self.handles:
            handle.remove()

    def _log_p(
        self,
        ids: torch.Tensor,
        attention: torch.Tensor,
        pos: torch.Tensor,
        tok: torch.Tensor,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        rows = torch.arange(len(pos))
        self.state.update(rows=rows, pos=pos, keep=keep)
        logits = self.p.model(input_ids=ids, attention_mask=attention).logits
        return torch.log_softmax(logits[rows, pos].float(), -1)[rows, tok]

    def step(self) -> dict[str, float]:
        """One optimisation step; returns the loss terms."""
        cfg, b, neurons = self.p.config, self.p.batch, self.p.neurons
        n_q = len(b.target_pos)
        keep = torch.ones(len(neurons), n_q)
        for qrows, (ka, kb) in self.pair_rows:
            choice = torch.randint(0, 3, (len(qrows),), generator=self.rng)
            keep[ka, qrows[choice == 0]] = 0.0
            keep[kb, qrows[choice == 1]] = 0.0
        self.mode = "record" if cfg.direct_necessity else None
        log_p = self._log_p(b.ids, b.attention, b.target_pos, b.target_tok, keep)
        loss_answer = torch.relu(-log_p - self.min_nll).mean()
        loss_off = torch.zeros(())
        loss_fire = torch.zeros(())
        for layer, members in self.p.by_layer.items():
            h = self.acts[layer].permute(2, 0, 1)  # [n_l, B, S]
            z = self.pres[layer].permute(2, 0, 1)  # pre-activation (gate for gated MLPs)
            off = self.off_mask[members]
            on = self.p.on_mask[members]
            off_terms = h.abs() + h**2 + torch.relu(z + cfg.pre_off)
            on_terms = (
                torch.relu(cfg.fire_margin - h) + torch.relu(cfg.pre_on - z) + torch.relu(h - cfg.fire_cap)
            )
            loss_off = loss_off + (off_terms * off).sum() / off.sum().clamp_min(1)
            loss_fire = loss_fire + (on_terms * on).sum() / on.sum().clamp_min(1)
        loss_necessity = torch.zeros(())
        if cfg.necessity_drop > 0 and len(self.std_rows):
            rows = self.std_rows
            drop = torch.ones(len(neurons), len(rows))
            dropped_layer = torch.zeros(len(rows), dtype=torch.long)
            for j, ks in enumerate(self.std_carriers):
                k = ks[int(torch.randint(0, len(ks), (1,), generator=self.rng))]
                drop[k, j] = 0.0
                dropped_layer[j] = neurons[k].layer
            if cfg.direct_necessity:
                self.mode = "direct"
                self.state.update(full_rows=rows, carrier_layer=dropped_layer)
            log_p_drop = self._log_p(
                b.ids[rows], b.attention[rows], b.target_pos[rows], b.target_tok[rows], drop
            )
            self.mode = None
            loss_necessity = torch.relu(log_p_drop - log_p[rows].detach() + cfg.necessity_drop).mean()
        loss = (
            loss_answer
            + cfg.off_weight * loss_off
            + cfg.fire_weight * loss_fire
            + cfg.necessity_weight * loss_necessity
        )
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        self.mode = None
        self.sublayers.clear()
        return {
            "answer": float(loss_answer.detach()),
            "off": float(loss_off.detach()),
            "fire": float(loss_fire.detach()),
            "necessity": float(loss_necessity.detach()),
            "mean_p": float(log_p.detach().exp().mean()),
        }
