"""Choose the edit requests of an editing experiment: the same facts for every neuron rule compared.

A fact qualifies when it has neurons in ``--language`` and a non-empty set under every rule of ``--rules``; the
first ``--count`` qualifying facts by a stable hash of their uuid are written as ``{"uuid": ...}`` lines.

    python experiments/edit_requests.py --neurons experiments/smollm2/results/neurons.json --language en \
        --rules language:en,carriers --count 12 --output experiments/smollm2/results/edits.jsonl
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from knlight.io import write_text_atomically
from knlight.neurons.neuron_file import read_neuron_file


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--neurons", required=True)
    parser.add_argument("--language", default="en")
    parser.add_argument("--rules", default="language_independent", help="comma-separated neuron kinds")
    parser.add_argument("--count", type=int, default=12)
    parser.add_argument("--output", required=True, type=Path)
    args = parser.parse_args()
    facts = read_neuron_file(args.neurons).facts

    def has(uuid: str, rule: str) -> bool:
        fact = facts[uuid]
        if rule.startswith("language:"):
            return bool(fact.neurons("language", rule.split(":", 1)[1]))
        return bool(fact.neurons(rule))

    rules = args.rules.split(",")
    chosen = sorted(
        (u for u in facts if facts[u].languages.get(args.language) and all(has(u, r) for r in rules)),
        key=lambda u: hashlib.sha256(u.encode()).hexdigest(),
    )[: args.count]
    write_text_atomically(args.output, "".join(json.dumps({"uuid": u}) + "\n" for u in sorted(chosen)))
    print(f"{len(chosen)} edit requests ({args.rules}) -> {args.output}")


if __name__ == "__main__":
    main()
