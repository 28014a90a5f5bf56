#!/usr/bin/env bash
# Rerun every reproduction row under the current protocol, cheapest and most valuable first, one
# process at a time with one thread (a 2-core machine shared with other work). Every step is
# resumable: killed, it continues from its last checkpoint when this script runs again, and
# finished rows and peers are answered from their caches.
#   nohup nice -n 19 scripts/rerun_tables.sh /work/shared/data > /tmp/tables-rerun.log 2>&1 &
set -u
DATA=${1:-/work/shared/data}
R="elbolab reproduce"
S="--set train.threads=1 --data-dir $DATA"
PEER="python benchmarks/peer/iwae_peer.py --data-dir $DATA"
step() { echo "== $(date -u +%H:%M:%S) $*"; "$@" || echo "== failed ($?): $*"; }

# the IWAE table's one-layer MNIST rows and their equal-budget peers
step $R iwae-table --only mnist-1layer-vae-k1 mnist-1layer-iwae-k1 mnist-1layer-vae-k5 mnist-1layer-iwae-k5 \
    mnist-1layer-vae-k50 mnist-1layer-iwae-k50 $S
step $PEER mnist-1layer-vae-k1
step $PEER mnist-1layer-iwae-k5
# the surgery table (the 10-latent row and its peer first)
step $R surgery-table --only mnist-vae-10latents $S
step $PEER mnist-vae-10latents --seeds 0-7
step $R surgery-table $S
# the VampPrior table's MLP rows on MNIST
step $R vampprior-table --only mnist-hierarchical-standard mnist-hierarchical-mog mnist-hierarchical-vampprior-data \
    mnist-hierarchical-vampprior mnist-1layer-standard mnist-1layer-vampprior mnist-1layer-planar-flow \
    mnist-1layer-iaf $S
# and the hierarchical VampPrior row's equal-budget peer (its IS evaluation is the long part: K = 5000
# on 10,000 test images, about 45 minutes of one core)
step python benchmarks/peer/vampprior_peer.py --data-dir $DATA
# the rest of the IWAE table, the other VampPrior datasets, the medium surgery table
step $R iwae-table $S
step $R vampprior-table --only omniglot-hierarchical-vampprior caltech-hierarchical-vampprior \
    frey-hierarchical-vampprior $S
step $R surgery-table --budget medium $S
# the convolutional rows: over half an hour of a core per epoch here (a GPU is the place for them)
step $R vampprior-table --only mnist-convhvae-vampprior mnist-pixelhvae-vampprior $S
# the first row at the paper's budget: 3,280 epochs, about 3.5 hours of one core through the fused step
step $R iwae-table --budget paper --only mnist-1layer-vae-k1 $S
