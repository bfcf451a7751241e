"""Neurons for facts the model does not know: the language-independent neurons of the *known* facts of the same
relation (new-knowledge injection, MATRICE's third use: "train the LIKN of related facts").

For each relation, the neurons in the LIKN of at least ``--min_facts`` known facts, most shared first, at most
``--size`` (default: the median LIKN size of the relation's known facts). Every unknown fact of the records file
gets its relation's set as its ``language_independent`` set and as its neurons in every language (so
``neuron_rule: random`` / ``ffn`` have the same count and layers to match).

    python experiments/relation_neurons.py --neurons experiments/gemma-large/results/neurons.json \
        --records experiments/gemma-large/data/gemma_large.unknown.jsonl \
        --output experiments/gemma-large/results/neurons-unknown.json
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter, defaultdict

from knlight.data.records import read_records
from knlight.neurons.neuron_file import FactNeurons, NeuronFile, read_neuron_file, write_neuron_file


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--neurons", required=True, help="neuron file of the known facts")
    parser.add_argument("--records", required=True, help="records of the unknown facts")
    parser.add_argument("--min_facts", type=int, default=2)
    parser.add_argument("--size", type=int, help="neurons per relation (default: median LIKN size)")
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    known = read_neuron_file(args.neurons)
    shared: dict[str, Counter[tuple[int, int]]] = defaultdict(Counter)
    sizes: dict[str, list[int]] = defaultdict(list)
    for fact in known.facts.values():
        if fact.relation and fact.language_independent:
            shared[fact.relation].update(fact.language_independent)
            sizes[fact.relation].append(len(fact.language_independent))
    per_relation = {}
    for relation, counts in shared.items():
        size = args.size or max(1, round(statistics.median(sizes[relation])))
        ranked = [n for n, c in counts.most_common() if c >= args.min_facts][:size]
        per_relation[relation] = ranked
    records = read_records(args.records)
    facts: dict[str, FactNeurons] = {}
    for record in records:
        neurons = per_relation.get(record.relation, [])
        fact = facts.setdefault(
            record.uuid, FactNeurons(relation=record.relation, language_independent=neurons)
        )
        fact.languages[record.language] = list(neurons)
    method = {
        "derived": "relation LIKN of the known facts (experiments/relation_neurons.py)",
        "from": args.neurons,
        "min_facts": args.min_facts,
        "size": args.size,
        "per_relation": {rel: len(ns) for rel, ns in sorted(per_relation.items())},
    }
    write_neuron_file(args.output, NeuronFile(known.model, known.num_layers, known.d_ff, method, facts))
    print(f"{len(facts)} unknown facts, neurons per relation {method['per_relation']} -> {args.output}")


if __name__ == "__main__":
    main()
