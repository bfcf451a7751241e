"""Training-free edits, as :class:`~knlight.neurons.edits.NeuronEdit`: Dai et al.'s direct update and scaling.

* :func:`direct_edit`: ``W_out[:, n] += λ2·E(new) − λ1·E(old)`` (Dai et al.);
* :func:`scale_edit`: ``W_out[:, n] ·= factor`` (0 suppresses a neuron at every position, 2 enhances it).

Pure torch, no Lightning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from knlight.lm import LanguageModel
from knlight.lm.sites import neuron_columns
from knlight.neurons.edit_layout import Neuron, NeuronEditError, model_and_sites
from knlight.neurons.neuron_edit import NeuronEdit


def output_columns(model: nn.Module | LanguageModel, neurons: Sequence[Neuron]) -> torch.Tensor:
    """``[len(neurons), d_model]``: each neuron's current column of its layer's FFN output projection."""
    _, sites = model_and_sites(model)
    cols = [neuron_columns(sites.out_projs[layer], sites.spec.conv1d)[:, index] for layer, index in neurons]
    return torch.stack(cols).detach()


def scale_edit(
    model: nn.Module | LanguageModel,
    neurons: Iterable[Neuron],
    factor: float,
    metadata: Mapping[str, Any] | None = None,
) -> NeuronEdit:
    """Scale neurons' output columns: ``W_out[:, n] ·= factor`` at every position (0 suppresses, 2 enhances).

    Equivalent to multiplying the activation ``h_n`` by ``factor`` everywhere (W_out is linear in h).
    """
    edit = NeuronEdit.for_model(model, neurons, {"method": f"scale×{factor:g}", **(metadata or {})})
    with torch.no_grad():
        edit.out_weight.copy_((factor - 1.0) * output_columns(model, edit.neurons).to(edit.out_weight.dtype))
    return edit


def token_embeddings(model: nn.Module | LanguageModel, which: str = "output") -> torch.Tensor:
    """``[vocab, d_model]``: the output (unembedding) or input embedding matrix."""
    net, _ = model_and_sites(model)
    if which not in ("output", "input"):
        raise ValueError(f"embedding {which!r}: choose 'output' (unembedding) or 'input' (token embedding)")
    module = net.get_output_embeddings() if which == "output" else net.get_input_embeddings()  # type: ignore[operator]
    if module is None:
        raise NeuronEditError(f"{type(net).__name__} has no {which} embeddings")
    return module.weight.detach()


def direct_edit(
    model: nn.Module | LanguageModel,
    requests: Sequence[tuple[Sequence[Neuron], int, int]],
    lambda_old: float = 1.0,
    lambda_new: float = 8.0,
    embedding: str = "output",
    metadata: Mapping[str, Any] | None = None,
) -> NeuronEdit:
    """Dai et al.'s training-free fact update as a :class:`NeuronEdit`.

    For each request ``(neurons, new_token, old_token)``: ``W_out[:, n] += λ_new·E(new) − λ_old·E(old)`` for
    every neuron n of the request (E = embedding row of the object's first token). Neurons shared by several
    requests receive the sum. Dai et al. used λ_old = 1, λ_new = 8 and BERT's (tied) word embeddings.

    Args:
        model: The model (its embeddings are read, never written).
        requests: Per fact, its neurons and the first token ids of the new and the old object.
        lambda_old: λ1, weight of the removed old-object direction.
        lambda_new: λ2, weight of the added new-object direction.
        embedding: ``output`` (unembedding rows: what the head reads) or ``input`` (token embeddings).
        metadata: Provenance for :meth:`NeuronEdit.save`.
    """
    neurons = {n for ns, _, _ in requests for n in ns}
    edit = NeuronEdit.for_model(
        model,
        neurons,
        {"method": "direct", "lambda_old": lambda_old, "lambda_new": lambda_new, "embedding": embedding,
         **(metadata or {})},
    )  # fmt: skip
    table = token_embeddings(model, embedding)
    row = {n: k for k, n in enumerate(edit.neurons)}
    with torch.no_grad():
        for ns, new, old in requests:
            direction = (lambda_new * table[new] - lambda_old * table[old]).to(edit.out_weight.dtype)
            for n in ns:
                edit.out_weight[row[(int(n[0]), int(n[1]))]] += direction
    return edit
