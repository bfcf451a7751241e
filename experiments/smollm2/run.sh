#!/usr/bin/env bash
# Issue 18 on SmolLM2-135M (English): data + probe, localization (Dai's zero baseline and AMIG), selection (Dai KN,
# uncertainty-aware, carriers, specificity, consistency), experiment 1 (intervention), 3 (editing, five neuron
# rules), 4 (DKN fact-checking on known and unknown facts), then the tables. Re-running resumes.
#   bash experiments/smollm2/run.sh                 # every step
#   STEPS="select intervene" bash experiments/smollm2/run.sh
cd "$(dirname "$0")/../.." && source .venv/bin/activate
E=experiments/smollm2 R=experiments/smollm2/results C=configs/smollm2
ALL="data localize localize-amig select intervene edit factcheck tables"
source experiments/lib.sh
mkdir -p $R
wants data && timed make_data python experiments/make_data.py --model smollm2-135m --languages en \
  --relations P36,P1376,P30,P17,P37,P103,P27,P19,P20,P140,P495,P364,P1412,P176,P178,P159 --probe_facts 60 \
  --min_known_languages 1 --facts 25 --queries 1 --keep_relations P37,P36,P1376,P27,P178,P176 --unknown_facts 10 \
  --output $E/data/smollm2_en.jsonl
base=(--config configs/trainer/localize.yaml --config configs/localize/smollm2-135m.yaml --config $C/localize.yaml)
wants localize && timed localize-zero knlight predict "${base[@]}"
wants localize-amig && timed localize-amig knlight predict "${base[@]}" --config $C/localize-amig.yaml
if wants select; then
  timed select-zero knlight select --attributions $E/runs/localize-zero/attributions --output $R/neurons.json \
    --uncertainty.enabled true --carriers.enabled true --specificity.enabled true --consistency.enabled true
  timed select-amig knlight select --attributions $E/runs/localize-amig/attributions --output $R/neurons-amig.json \
    --uncertainty.enabled true --specificity.enabled true --consistency.enabled true
  cp $E/runs/localize-zero/attributions/summary.json $R/localize-zero-summary.json
fi
if wants intervene; then
  timed intervene knlight test --config configs/intervene/gemma3-270m.yaml --config $C/intervene.yaml
  rm -rf $R/intervention && cp -r "$(latest $E/runs/intervene)/intervention" $R/intervention
fi
if wants edit; then
  python experiments/edit_requests.py --neurons $R/neurons.json --language en --rules language:en,carriers \
    --count 12 --output $R/edits.jsonl
  for rule in language:en carriers uncertainty random ffn; do
    name=edit-${rule/:/-}
    timed $name knlight fit --config configs/edit/gemma3-270m.yaml --config $C/edit.yaml \
      --model.init_args.neuron_rule $rule --trainer.logger.init_args.name $name
    mkdir -p $R/editing/$name && cp "$(latest $E/runs/$name)"/editing_*.{json,csv} $R/editing/$name/
  done
fi
if wants factcheck; then
  timed factcheck knlight test --config configs/factcheck/gemma3-270m.yaml --config $C/factcheck.yaml
  rm -rf $R/factcheck && cp -r "$(latest $E/runs/factcheck)/factcheck" $R/factcheck
fi
wants tables && timed tables python experiments/tables.py $E
exit 0
