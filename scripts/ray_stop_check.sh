#!/usr/bin/env bash
# How `elbolab reproduce --executor ray` stops: two rows are frozen mid-training (the crash tests'
# ELBOLAB_TEST_STOP hook), the driver gets SIGKILL or SIGTERM, then the Ray processes left are counted.
#   scripts/ray_stop_check.sh KILL|TERM [results folder]
# Needs Ray (pip install 'elbolab[ray]'); takes about a minute.
set -u
SIG=${1:?usage: $0 KILL|TERM [results]}
RESULTS=${2:-$(mktemp -d)/results}
ROWS=(mnist-1layer-vae-k5 mnist-1layer-iwae-k5)
TINY=(--set data.name=binarized-mnist-embedded --set train.epochs=1 --set train.batch_size=1000
      --set model.hidden=[8] --set model.latent_dim=2 --set eval.k_importance=5
      --set train.checkpoint_minutes=0 --set train.checkpoint_steps=2)
ELBOLAB_TEST_STOP=step#3 python -m elbolab.cli reproduce iwae-table --only "${ROWS[@]}" --workers 2 \
    --executor ray --results "$RESULTS" "${TINY[@]}" >/dev/null 2>&1 &
DRIVER=$!
frozen() { ps -eo pid=,stat=,cmd= | awk '$2 ~ /^T/ && /ray/ {print $1}'; }
for _ in $(seq 600); do [ "$(frozen | wc -l)" -ge 2 ] && break; sleep 0.5; done
TASKS=$(frozen)
echo "tasks frozen mid-row: $(echo $TASKS)"
kill -"$SIG" "$DRIVER"
for p in $TASKS; do kill -CONT "$p"; done
wait "$DRIVER"; echo "driver exit code: $?"
alive() { for p in $TASKS; do [ -e "/proc/$p" ] && awk '$3 != "Z" {print FILENAME}' "/proc/$p/stat"; done | wc -l; }
for t in $(seq 0 5 300); do
    left=$(pgrep -f 'ray::|raylet|gcs_server' | wc -l)
    [ $((t % 20)) -eq 0 ] && echo "after ${t} s: $(alive) of the frozen tasks alive, $left Ray processes left"
    [ "$left" -eq 0 ] && { echo "after ${t} s: no Ray process left"; break; }
    sleep 5
done
for run in "$RESULTS"/iwae-table/quick/rows/*/run; do
    echo "$run: $(python -c "import json, sys; print(json.load(open(sys.argv[1]))['status'])" "$run/run.json")"
done
echo "rerun: python -m elbolab.cli reproduce iwae-table --only ${ROWS[*]} --workers 2 --executor ray --results $RESULTS ${TINY[*]}"
