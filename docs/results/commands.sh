#!/bin/bash
# Every run behind docs/results.md, resumable: `spafl compare` skips finished runs and resumes unfinished
# ones from their checkpoints (checkpoints and client files stay out of git). On 2 CPU cores a 500-round
# fmnist-paper run takes 20-40 min; all of this is about 12 hours. Redraw without training: `make results`.
set -e
cd "$(dirname "$0")/../.."
spafl=${SPAFL:-.venv/bin/spafl}
paper=(--preset fmnist-paper --set record_masks=40,150,500 --quiet)

# 1. Learning-rate sweep of the baselines: 100 rounds, seed 0, evaluated every 10 rounds. One call per entry,
#    so that an entry that diverges stops only itself. FedPM trains mask scores only: its score lr is swept.
#    Every value is explicit, so a value the preset later takes from the sweep (METHOD_SETTINGS) changes no entry.
sweep=()
for method in fedavg local heterofl fjord fedp3 fedspa lotteryfl; do
  sweep+=("$method:lr=0.0003" "$method:lr=0.001" "$method:lr=0.003")
done
sweep+=("fedpm:fedpm_lr=0.03" "fedpm:fedpm_lr=0.1" "fedpm:fedpm_lr=0.3")
# A method whose best value lies at the edge of its three gets one value more beyond it.
sweep+=("heterofl:lr=0.0001" "lotteryfl:lr=0.01" "fedpm:fedpm_lr=1")
for spec in "${sweep[@]}"; do
  $spafl compare --preset fmnist-paper --set rounds=100 --set eval_every=10 --seeds 0 --quiet \
      --methods "$spec" --out docs/results/sweep || echo "sweep entry $spec failed"
done
$spafl compare --from docs/results/sweep > /dev/null  # each call above drew its own entry only: the whole sweep

# 2. SpaFL with the reference's settings, three seeds; the baselines with the swept values in the preset.
$spafl compare "${paper[@]}" --methods spafl --seeds 0,1,2 --out docs/results/fmnist-paper
$spafl compare "${paper[@]}" --methods fedavg,local,fedpm,heterofl,fjord,fedp3,fedspa,lotteryfl --seeds 0 \
    --out docs/results/fmnist-paper

# 3. The th_coeff trade-off (seed 0; th_coeff=0.002 is the plain spafl run).
$spafl compare "${paper[@]}" --methods spafl:th_coeff=0.0005,spafl:th_coeff=0.001,spafl:th_coeff=0.004 --seeds 0 \
    --out docs/results/fmnist-paper

# 4. Ablations (seed 0), beside the plain run: that is step 2's SpaFL seed 0, the same configuration, so its
#    files are copied rather than trained again (compare checks the copied config.json against the command's).
mkdir -p docs/results/ablations/spafl/seed0
for file in config.json metrics.jsonl summary.json; do
  [ -e docs/results/ablations/spafl/seed0/$file ] || cp docs/results/fmnist-paper/spafl/seed0/$file docs/results/ablations/spafl/seed0/
done
$spafl compare "${paper[@]}" --seeds 0 --out docs/results/ablations --methods \
spafl,spafl:importance_update=off,spafl:frozen_weights=true,spafl:ste=outside_unit,spafl:ste=long_tailed,\
spafl:threshold_schedule=last_epoch,spafl:importance_delta=since_last_seen,spafl:importance_sign=per_weight

# Each call above drew the table and figures of its own methods: draw every directory's whole set again.
for dir in docs/results/fmnist-paper docs/results/ablations; do $spafl compare --from $dir > /dev/null; done
