"""The language model as knlight sees it: loading, neuron sites, query encoding, hooks, shared forwards.

Everything that knows how a Hugging Face model is laid out or called lives here: where the FFN neurons are
(:mod:`~knlight.lm.sites`), how a cloze query becomes inputs and targets (:mod:`~knlight.lm.prompts`), hooks
on the neuron activations (:mod:`~knlight.lm.hooks`), transformers' calling conventions
(:mod:`~knlight.lm.upstream`), the shared forwards (:class:`LanguageModel`), loading
(:mod:`~knlight.lm.loading`, packaged real models in :mod:`~knlight.lm.real`, tiny random models in
:mod:`~knlight.lm.tiny`). Pure torch + transformers, no Lightning.
"""

from knlight.lm.loading import ModelNotFoundError, load_config, load_lm, model_source, parse_dtype
from knlight.lm.model import LanguageModel
from knlight.lm.prompts import SLOT, EncodedQuery, QueryError, encode_query

__all__ = [
    "SLOT",
    "EncodedQuery",
    "LanguageModel",
    "ModelNotFoundError",
    "QueryError",
    "encode_query",
    "load_config",
    "load_lm",
    "model_source",
    "parse_dtype",
]
