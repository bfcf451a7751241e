"""Planted knowledge: small models whose knowledge neurons are known, to score localisation, LIKN and DKN.

>>> from knlight.planted import plant  # doctest: +SKIP
>>> planted = plant("gpt2", seed=0)  # doctest: +SKIP
>>> planted.report["p_clean"], planted.truth[0]  # doctest: +SKIP
>>> planted.save("runs/planted/gpt2-0"); again = load_planted("runs/planted/gpt2-0")  # doctest: +SKIP
"""

from knlight.planted.config import CARRIER_KINDS, KINDS, PlantConfig, PlantedNeuron
from knlight.planted.export import PlantedFileError, read_records, read_truth, write_records
from knlight.planted.facts import FactSet, SyntheticFact, build_tokenizer, make_facts
from knlight.planted.model import PlantedModel, load_planted, save_planted
from knlight.planted.planter import plant
from knlight.planted.verify import verify_plant

__all__ = [
    "CARRIER_KINDS",
    "KINDS",
    "FactSet",
    "PlantConfig",
    "PlantedFileError",
    "PlantedModel",
    "PlantedNeuron",
    "SyntheticFact",
    "build_tokenizer",
    "load_planted",
    "make_facts",
    "plant",
    "read_records",
    "read_truth",
    "save_planted",
    "verify_plant",
    "write_records",
]
