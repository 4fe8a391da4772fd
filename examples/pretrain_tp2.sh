#!/usr/bin/env bash
# One node, 2 processes, tensor parallel 2, on real data (preprocess first, see README).
# Usage: examples/pretrain_tp2.sh DATA_PREFIX TOKENIZER_MODEL [extra flags]
set -euo pipefail
DATA=${1:?data prefix (without .bin/.idx)}; TOK=${2:?sentencepiece model}; shift 2
torchrun --nproc_per_node 2 pretrain_nsmla.py \
    --tensor-model-parallel-size 2 \
    --data-path "$DATA" --tokenizer-model "$TOK" \
    --num-layers 12 --hidden-size 1024 --num-attention-heads 16 \
    --q-lora-rank 512 --kv-lora-rank 512 --qk-head-dim 128 --qk-pos-emb-head-dim 64 --v-head-dim 128 \
    --seq-length 4096 --nsmla-topk 512 --micro-batch-size 1 --global-batch-size 16 \
    --train-iters 10000 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 500 --bf16 \
    --tensorboard-dir runs/tp2 --save checkpoints/tp2 --save-interval 1000 --load checkpoints/tp2 \
    "$@"
