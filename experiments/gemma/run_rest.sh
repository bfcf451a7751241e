#!/usr/bin/env bash
# Experiments 1-4 after localization (experiments/gemma/run_localize.sh): selection, intervention, editing with
# four neuron rules, fact-checking. Each step logs to experiments/gemma/logs/<step>.log with its wall time; the
# result files are copied to experiments/gemma/results/.
set -uo pipefail   # a failed step is logged; the later ones still run
cd "$(dirname "$0")/../.."
source .venv/bin/activate
export OMP_NUM_THREADS=2
G=experiments/gemma
R=$G/results
mkdir -p $G/logs $R
timed() {  # timed <log name> <command...>
  local name=$1; shift
  echo "\$ $*" > $G/logs/$name.log
  /usr/bin/time -f "WALL %e s, max RSS %M KB" "$@" >> $G/logs/$name.log 2>&1
}
latest() { ls -d "$1"/version_* | sort -t_ -k2 -n | tail -1; }

ALL="select-zero select-amig intervene edit factcheck"
wants() { [[ " ${STEPS:-$ALL} " == *" $1 "* ]]; }

for baseline in zero amig; do  # strict LIKN (all 4 languages), and LIKN in >= 3 of 4
  if wants select-$baseline; then
    attributions=$G/runs/localize-$baseline/attributions
    timed select-$baseline knlight select --attributions $attributions \
      --output $R/neurons-$baseline.json --uncertainty.enabled true
    timed select-$baseline-likn3 knlight select --attributions $attributions \
      --output $R/neurons-$baseline-likn3.json --uncertainty.enabled true --likn.min_languages 3
    cp $attributions/summary.json $R/localize-$baseline-summary.json
  fi
done

if wants intervene; then
  timed intervene knlight test --config configs/intervene/gemma3-270m.yaml --config configs/gemma/intervene.yaml
  rm -rf $R/intervention && cp -r "$(latest $G/runs/intervene)/intervention" $R/intervention
fi

if wants edit; then
  # the same edit requests for every rule: facts with LIKN (>= 3 of 4 languages), at most 12, by a stable hash
  python - <<'PY'
import hashlib, json
facts = json.load(open("experiments/gemma/results/neurons-zero-likn3.json"))["facts"]
chosen = sorted((u for u, f in facts.items() if f.get("language_independent") and f.get("languages", {}).get("en")),
                key=lambda u: hashlib.sha256(u.encode()).hexdigest())[:12]
with open("experiments/gemma/results/edits.jsonl", "w") as out:
    for uuid in sorted(chosen):
        out.write(json.dumps({"uuid": uuid}) + "\n")
print(len(chosen), "edit requests")
PY
  for rule in language_independent language:en random ffn; do
    name=edit-${rule/:/-}
    timed $name knlight fit --config configs/edit/gemma3-270m.yaml --config configs/gemma/edit.yaml \
      --model.init_args.neuron_rule $rule --trainer.logger.init_args.name $name
    mkdir -p $R/editing/$name && cp "$(latest $G/runs/$name)"/editing_*.{json,csv} $R/editing/$name/
  done
fi

if wants factcheck; then
  timed factcheck knlight test --config configs/factcheck/gemma3-270m.yaml --config configs/gemma/factcheck.yaml
  rm -rf $R/factcheck && cp -r "$(latest $G/runs/factcheck)/factcheck" $R/factcheck   # test/results.*
fi
