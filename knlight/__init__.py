"""knlight: find, test and use knowledge neurons in multilingual language models (PyTorch Lightning)."""

from knlight.lm import LanguageModel, load_lm
from knlight.neurons.attribution import Attribution, attribute, attribute_batch, quadrature

__all__ = ["Attribution", "LanguageModel", "attribute", "attribute_batch", "load_lm", "quadrature"]
__version__ = "0.1.0"
