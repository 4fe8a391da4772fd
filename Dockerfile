# NSMLA on an NGC PyTorch container (torch, CUDA, NCCL and Transformer Engine preinstalled).
# Build:  docker build -t nsmla .
# Run:    docker run --gpus all --rm -it nsmla python pretrain_nsmla.py
FROM nvcr.io/nvidia/pytorch:25.10-py3

WORKDIR /workspace/nsmla
# megatron-core is not part of the NGC image; the rest of our dependencies are small.
RUN pip install --no-cache-dir megatron-core==0.16.1 sentencepiece==0.2.3 tensorboard psutil pytest
COPY . .
# --no-deps keeps the container's own torch/triton build (CUDA-matched) instead of the CPU pins.
RUN pip install --no-cache-dir --no-deps -e .
CMD ["python", "pretrain_nsmla.py"]
