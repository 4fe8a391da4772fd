#!/usr/bin/env bash
# The embedded default: a tiny NSMLA model on the bundled Shakespeare corpus (CPU or GPU),
# with TensorBoard logs and a checkpoint every 50 iterations.
set -euo pipefail
python pretrain_nsmla.py \
    --tensorboard-dir runs/tiny \
    --save checkpoints/tiny --save-interval 50 \
    "$@"
