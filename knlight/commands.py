"""The ``knlight`` commands beside LightningCLI's fit/validate/test/predict: ``select``, ``summary``, ``data build``.

Each is a plain function parsed by jsonargparse (``--help`` documents it from the docstrings, ``--config
file.yaml`` reads its options from a file, ``--print_config`` writes one), as litgpt's commands are.

    knlight select --attributions runs/tiny-localize/attributions --output neurons.json --dkn.enabled true
    knlight summary runs/quickstart/attributions
    knlight data build mpararel --root ../shared/data/mpararel --languages [en,de] --output data/x.jsonl
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from knlight.selection.options import KnownOptions


def summary(attributions: str, p: float = 0.5, top: int = 3, known: KnownOptions = KnownOptions()) -> None:
    """Print a predict run's top neurons per fact and language and its language-independent neurons.

    Args:
        attributions: The predict output folder (``.../attributions``) or its ``attributions.jsonl``.
        p: Prompt-sharing fraction: a neuron is a fact's neuron in a language when it is selected for at
            least this fraction of the fact's queries in that language.
        top: Neurons shown per fact and language (by mean score over the queries).
        known: The knowledge filter, as ``knlight select``'s: a language where the model does not know the fact
            is marked NOT KNOWN and lists no neurons (``--known.enabled false`` lists every language).
    """
    from knlight.selection.summary import summarize

    print(summarize(attributions, p, top, known))  # the command's output, not progress


def _select_component() -> Callable[..., Any]:
    from knlight.selection import run_selection

    return run_selection


def _data_component() -> dict[str, Any]:
    from knlight.data.build import SUBCOMMANDS

    return {"build": {fn.__name__: fn for fn in SUBCOMMANDS}}


COMMANDS: dict[str, tuple[Callable[[], Any], bool, str]] = {
    "select": (_select_component, False, "Select knowledge neurons from a predict run into a neuron file."),
    "summary": (lambda: summary, True, "Print a predict run's top and language-independent neurons."),
    "data": (
        _data_component,
        False,
        "Build RML-LAMA records from the real sources (knlight data build <source>).",
    ),
}
"""Command name -> (its component, whether required arguments are positional, one-line help)."""


def run_command(name: str, args: Sequence[str]) -> None:
    """Parse ``args`` for the command ``name`` and run it (``--help`` prints its documentation and exits)."""
    from jsonargparse import CLI

    component, positional, _ = COMMANDS[name]
    CLI(component(), args=list(args), prog=f"knlight {name}", as_positional=positional,
        description=COMMANDS[name][2])  # fmt: skip


def command_parser(name: str) -> Any:
    """A stand-in parser for listing the command in ``knlight --help`` (the command itself is parsed by
    :func:`run_command`, which ``knlight.cli.main`` calls before LightningCLI sees the arguments)."""
    from jsonargparse import ArgumentParser

    return ArgumentParser(prog=f"knlight {name}", description=COMMANDS[name][2])
