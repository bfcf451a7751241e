#!/usr/bin/env bash
# Issue 18 on Gemma 3 270M, the larger multilingual set: data + probe, localization (Dai's zero baseline), selection
# (Dai KN, LIKN over the known languages, uncertainty-aware, carriers, specificity, consistency), experiments 1-2
# (intervention, cross-lingual), 3 (editing, five neuron rules), 4 (DKN fact-checking on known and unknown facts),
# 5 (knowledge enhancement), 6 (new-knowledge injection), then the tables. Re-running resumes.
#   bash experiments/gemma-large/run.sh             # every step
#   STEPS="select intervene" bash experiments/gemma-large/run.sh
cd "$(dirname "$0")/../.." && source .venv/bin/activate
E=experiments/gemma-large R=experiments/gemma-large/results C=configs/gemma-large
ALL="data localize localize-amig select select-amig intervene enhance edit amig-edits inject factcheck tables"
source experiments/lib.sh
mkdir -p $R
# the issue-9 probe ranks (same model, same queries) seed the cache: only the new languages are probed
[ -f $E/data/probe_ranks.json ] || { mkdir -p $E/data && cp experiments/gemma/data/probe_ranks.json $E/data/; }
wants data && timed make_data python experiments/make_data.py --languages en,de,es,fr,it,ru,ja,zh-hans,ar,ko \
  --relations P36,P1376,P37,P30,P103,P27,P17,P364 \
  --probe_facts 40 --min_known_languages 2 --facts 10 --queries 1 --unknown_facts 5 \
  --keep_relations P1376,P36,P37,P27,P30,P103 --keep_languages en,de,es,fr,it,ru,ja,zh-hans,ar,ko \
  --output $E/data/gemma_large.jsonl
base=(--config configs/trainer/localize.yaml --config configs/localize/gemma3-270m.yaml --config $C/localize.yaml)
wants localize && timed localize-zero knlight predict "${base[@]}"
wants localize-amig && timed localize-amig knlight predict "${base[@]}" --config $C/localize-amig.yaml
if wants select; then
  timed select-zero knlight select --attributions $E/runs/localize-zero/attributions --output $R/neurons.json \
    --likn.min_languages 2 --uncertainty.enabled true --carriers.enabled true --specificity.enabled true \
    --consistency.enabled true
  cp $E/runs/localize-zero/attributions/summary.json $R/localize-zero-summary.json
fi
if wants select-amig; then
  timed select-amig knlight select --attributions $E/runs/localize-amig/attributions --output $R/neurons-amig.json \
    --likn.min_languages 2 --uncertainty.enabled true --specificity.enabled true --consistency.enabled true
  cp $E/runs/localize-amig/attributions/summary.json $R/localize-amig-summary.json
fi
if wants intervene; then
  timed intervene knlight test --config configs/intervene/gemma3-270m.yaml --config $C/intervene.yaml
  rm -rf $R/intervention && cp -r "$(latest $E/runs/intervene)/intervention" $R/intervention
fi
if wants enhance; then
  timed enhance knlight validate --config configs/edit/enhance-gemma3-270m.yaml --config $C/enhance.yaml
  mkdir -p $R/enhance && cp "$(latest $E/runs/enhance)"/editing_*.{json,csv} $R/enhance/
fi
if wants edit; then
  python experiments/edit_requests.py --neurons $R/neurons.json --language en \
    --rules language:en,language_independent,carriers --count 12 --output $R/edits.jsonl
  for rule in language_independent language:en carriers uncertainty random ffn; do
    name=edit-${rule/:/-}
    timed $name knlight fit --config configs/edit/gemma3-270m.yaml --config $C/edit.yaml \
      --model.init_args.neuron_rule $rule --trainer.logger.init_args.name $name
    mkdir -p $R/editing/$name && cp "$(latest $E/runs/$name)"/editing_*.{json,csv} $R/editing/$name/
  done
fi
if wants amig-edits; then  # experiment 3's AMIG rule: AMIG localization and selection of the 12 edited facts
  python experiments/subset_records.py --records $E/data/gemma_large.jsonl --uuids_from $R/edits.jsonl \
    --output $E/data/gemma_large.edits.jsonl
  timed localize-amig-edits knlight predict "${base[@]}" --config $C/localize-amig.yaml \
    --config $C/localize-amig-edits.yaml --trainer.devices 2 --trainer.strategy ddp
  timed select-amig-edits knlight select --attributions $E/runs/localize-amig-edits/attributions \
    --output $R/neurons-amig-edits.json --likn.min_languages 2 --uncertainty.enabled true --specificity.enabled true
  for rule in language:en language_independent; do
    name=edit-amig-${rule/:/-}
    timed $name knlight fit --config configs/edit/gemma3-270m.yaml --config $C/edit.yaml \
      --model.init_args.neurons $R/neurons-amig-edits.json --model.init_args.neuron_rule $rule \
      --trainer.logger.init_args.name $name
    mkdir -p $R/editing/$name && cp "$(latest $E/runs/$name)"/editing_*.{json,csv} $R/editing/$name/
  done
  for source in amig:neurons-amig-edits dai-edits:neurons; do  # experiment 5 on the same 12 facts
    name=enhance-${source%%:*}
    timed $name knlight validate --config configs/edit/enhance-gemma3-270m.yaml --config $C/enhance.yaml \
      --model.init_args.neurons $R/${source#*:}.json --data.init_args.path $E/data/gemma_large.edits.jsonl \
      --trainer.logger.init_args.name $name
    mkdir -p $R/$name && cp "$(latest $E/runs/$name)"/editing_*.{json,csv} $R/$name/
  done
fi
if wants inject; then
  python experiments/relation_neurons.py --neurons $R/neurons.json --records $E/data/gemma_large.unknown.jsonl \
    --output $R/neurons-unknown.json
  for rule in language_independent random ffn; do
    name=inject-${rule}
    timed $name knlight fit --config configs/edit/inject-gemma3-270m.yaml --config $C/inject.yaml \
      --model.init_args.neuron_rule $rule --trainer.logger.init_args.name $name
    mkdir -p $R/injection/$name && cp "$(latest $E/runs/$name)"/editing_*.{json,csv} $R/injection/$name/
  done
fi
if wants factcheck; then
  timed factcheck knlight test --config configs/factcheck/gemma3-270m.yaml --config $C/factcheck.yaml
  rm -rf $R/factcheck && cp -r "$(latest $E/runs/factcheck)/factcheck" $R/factcheck
fi
wants tables && timed tables python experiments/tables.py $E
exit 0
