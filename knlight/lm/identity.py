"""What identifies a loaded model's results: its name, architecture, weights and tokenizer (cheaply)."""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any

import torch

from knlight.io import short_hash

if TYPE_CHECKING:
    from knlight.lm.model import LanguageModel


def model_identity(name: str, lm: LanguageModel) -> dict[str, Any]:
    """What identifies a loaded model's results: its name, architecture, weights and tokenizer.

    Hashing every weight would take minutes for a large model; a sample of each parameter (its first and last
    values and a strided few) changes whenever the weights differ in practice (another seed, checkpoint or
    fine-tune), as the parameter names and shapes change with the architecture.

    Args:
        name: The model as configured (``tiny:gpt2``, a hub id, a folder).
        lm: The loaded model.

    Returns:
        ``{"name", "type", "parameters", "shapes", "weights", "tokenizer"}``: the name, the transformers
        ``model_type``, the number of parameters, and short hashes of the parameter names / shapes / dtypes, of
        the weight samples and of the tokenizer's vocabulary.
    """
    shapes, samples = hashlib.sha256(), hashlib.sha256()
    count = 0
    for parameter_name, parameter in sorted(lm.model.named_parameters()):
        count += parameter.numel()
        shapes.update(f"{parameter_name}:{tuple(parameter.shape)}:{parameter.dtype};".encode())
        if parameter.is_meta or parameter.numel() == 0:
            continue  # not materialised (offloaded): its shape still counts
        flat = parameter.detach().reshape(-1)
        stride = max(1, flat.numel() // 8)
        sample = torch.cat([flat[:8], flat[::stride][:8], flat[-8:]]).float().cpu()
        samples.update(parameter_name.encode() + sample.numpy().tobytes())
    vocab = sorted(lm.tokenizer.get_vocab().items())
    return {
        "name": name,
        "type": getattr(lm.model.config, "model_type", type(lm.model).__name__),
        "parameters": count,
        "shapes": shapes.hexdigest()[:16],
        "weights": samples.hexdigest()[:16],
        "tokenizer": short_hash(vocab),
    }
