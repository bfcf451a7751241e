"""knlight: find, test and use knowledge neurons in multilingual language models (PyTorch Lightning).

The public API is imported lazily so that light entry points (``python -m knlight.data.build``) do not pay
for importing torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = [
    "Attribution",
    "IGOptions",
    "LMOptions",
    "LanguageModel",
    "attribute",
    "attribute_batch",
    "load_lm",
    "quadrature",
]

_LAZY = {
    "Attribution": "knlight.neurons.attribution",
    "attribute": "knlight.neurons.attribution",
    "attribute_batch": "knlight.neurons.attribution",
    "IGOptions": "knlight.neurons.ig",
    "LMOptions": "knlight.lm.options",
    "quadrature": "knlight.neurons.ig",
    "LanguageModel": "knlight.lm",
    "load_lm": "knlight.lm",
}

if TYPE_CHECKING:
    from knlight.lm import LanguageModel, load_lm
    from knlight.lm.options import LMOptions
    from knlight.neurons.attribution import Attribution, attribute, attribute_batch
    from knlight.neurons.ig import IGOptions, quadrature


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'knlight' has no attribute {name!r}")
