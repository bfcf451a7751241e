"""A language model as knlight sees it: weights, tokenizer, neuron sites, and the few forwards every task shares.

:class:`LanguageModel` owns the mechanics that would otherwise be written in every task: right padding of a
batch (:meth:`LanguageModel.pad`), the LM head with Gemma's logit soft-cap (:meth:`LanguageModel.head`), and
the log-probabilities at an encoded query's target positions (:meth:`LanguageModel.target_log_probs`).
Loading lives in :mod:`knlight.lm.loading`. Pure torch + transformers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from knlight.errors import ConfigError
from knlight.lm.prompts import EncodedQuery, QueryError, encode_query
from knlight.lm.sites import NeuronSites, resolve_sites
from knlight.lm.upstream import base_model_forward, last_hidden_state


@dataclass
class LanguageModel:
    """A Hugging Face LM-head model, its tokenizer and its resolved neuron sites.

    The base weights are frozen (``requires_grad_(False)``): knlight never trains them; attribution takes
    gradients with respect to activations only, and editing trains separate neuron deltas.
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    sites: NeuronSites = field(init=False)

    def __post_init__(self) -> None:
        self.model.eval()
        self.model.requires_grad_(False)
        self.sites = resolve_sites(self.model)
        if self.tokenizer.pad_token_id is None:
            # Padding is always masked out; any id will do, EOS is the conventional choice.
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token

    @property
    def masked(self) -> bool:
        """True for masked LMs (targets are mask positions), False for causal LMs."""
        return self.sites.spec.masked

    @property
    def num_layers(self) -> int:
        return self.sites.num_layers

    @property
    def d_ff(self) -> int:
        return self.sites.d_ff

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def baseline_token_id(self) -> int:
        """Token that replaces a word for the AMIG baseline: [MASK] (masked LMs) or EOS (causal LMs)."""
        token = self.tokenizer.mask_token_id if self.masked else self.tokenizer.eos_token_id
        if token is None:
            raise ConfigError(
                f"tokenizer {type(self.tokenizer).__name__} has no {'mask' if self.masked else 'EOS'} token, "
                "which the AMIG baseline needs; use the zero baseline or a tokenizer that has one"
            )
        return int(token)

    @property
    def pad_token_id(self) -> int:
        return int(self.tokenizer.pad_token_id)  # type: ignore[arg-type]

    @property
    def max_positions(self) -> int | None:
        """Longest input the model's position embeddings allow (None when unbounded, e.g. ALiBi)."""
        config = self.model.config
        if config.model_type == "bloom":
            return None
        limit = getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
        if limit is None:
            return None
        if config.model_type in ("xlm-roberta", "roberta", "camembert"):
            limit -= int(config.pad_token_id or 0) + 1  # RoBERTa positions start after the padding index
        return int(limit)

    def encode(self, query: str, answer: str) -> EncodedQuery:
        """Encode a cloze query (object slot ``[Y]``) and its answer; see :func:`encode_query`.

        Raises:
            QueryError: Besides :func:`encode_query`'s errors, when the input is longer than the model allows.
        """
        encoded = encode_query(
            self.tokenizer, query, answer, masked=self.masked, mask_token_id=self.tokenizer.mask_token_id
        )
        limit = self.max_positions
        if limit is not None and len(encoded.input_ids) > limit:
            raise QueryError(
                f"query {query!r} with answer {answer!r} is {len(encoded.input_ids)} tokens long, but the model "
                f"takes at most {limit} positions; shorten the query or leave the record out of the data"
            )
        return encoded

    # -- the forwards every task shares -----------------------------------------------------------------------

    def pad(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``input_ids`` and ``attention_mask`` ``[batch, longest]`` (on the CPU).

        Right padding is exact for causal LMs (nothing attends to a later position) and masked out for masked
        LMs.
        """
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, sequence in enumerate(sequences):
            ids[row, : len(sequence)] = torch.tensor(list(sequence))
            mask[row, : len(sequence)] = 1
        return ids, mask

    def head(self, hidden: torch.Tensor, final_norm: bool = False) -> torch.Tensor:
        """Logits of final hidden states: the final norm when asked (base models already apply it), the LM head
        and Gemma's logit soft-cap."""
        sites = self.sites
        if final_norm and sites.final_norm is not None:
            hidden = sites.final_norm(hidden)
        logits = sites.head(hidden)
        if sites.logit_softcap:
            logits = torch.tanh(logits / sites.logit_softcap) * sites.logit_softcap
        return logits

    def target_log_probs(self, encoded: Sequence[EncodedQuery]) -> list[torch.Tensor]:
        """Per query, ``[answer tokens, vocab]`` log-probabilities at its target positions (one padded forward,
        gradients flow when enabled).

        The LM head runs at the target positions only (a 262k-token head at every position of a batch would
        cost more than the model itself).
        """
        ids, mask = self.pad([e.input_ids for e in encoded])
        device = self.device
        output = base_model_forward(self.model, input_ids=ids.to(device), attention_mask=mask.to(device))
        rows = torch.tensor([r for r, e in enumerate(encoded) for _ in e.targets], device=device)
        positions = torch.tensor([p for e in encoded for p, _ in e.targets], device=device)
        logits = self.head(last_hidden_state(output)[rows, positions])
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        return list(log_probs.split([len(e.targets) for e in encoded]))
