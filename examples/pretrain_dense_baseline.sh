#!/usr/bin/env bash
# Dense MLA baseline: same model, same data, every layer dense. Compare with pretrain_tiny.sh.
set -euo pipefail
python pretrain_nsmla.py --nsmla-attention dense --tensorboard-dir runs/tiny-dense "$@"
