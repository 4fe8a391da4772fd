"""Datasets for training: megatron-core GPTDataset over .bin/.idx files, mock data, and the
embedded default corpus; and deterministic batch selection so a resumed run sees the same data."""

from __future__ import annotations

import os

import numpy as np
import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

from .arguments import ArgumentError
from .corpus import prepare_default_data
from .data_checks import check_data_prefix, parse_data_path
from .tokenizer import SentencePieceTokenizer


class _MockTokenizer:
    """What MockGPTDataset needs of a tokenizer: a vocabulary size and an end-of-document id."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = 0
        self.pad = 0
        self.unique_identifiers = {"class": "mock", "vocab_size": vocab_size}


def default_cache_dir(args) -> str:
    return args.data_cache_path or os.path.join(os.path.expanduser("~"), ".cache", "nsmla")


def resolve_data(args):
    """Fill args.data_path/args.tokenizer_model (the default corpus when neither data flag is given)
    and return the tokenizer. Rank 0 prepares the default corpus first; the others then reuse it."""
    if args.mock_data:
        return _MockTokenizer(args.vocab_size)
    if not args.data_path:
        if args.tokenizer_model:
            raise ArgumentError("--tokenizer-model given without --data-path; give both, or neither for the default corpus")
        rank = dist.get_rank()
        if rank == 0:
            prepare_default_data(default_cache_dir(args), args.default_vocab_size)
        dist.barrier()
        prefix, model = prepare_default_data(default_cache_dir(args), args.default_vocab_size)
        args.data_path, args.tokenizer_model = [prefix], model
    try:
        tokenizer = SentencePieceTokenizer(args.tokenizer_model)
    except (FileNotFoundError, OSError, RuntimeError) as err:
        raise ArgumentError(f"--tokenizer-model {args.tokenizer_model}: {err}") from err
    try:
        prefixes, _ = parse_data_path(args.data_path)
        for prefix in prefixes:
            check_data_prefix(prefix, tokenizer.vocab_size)
    except ValueError as err:
        raise ArgumentError(str(err)) from err
    return tokenizer


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's rule: pad so the embedding splits evenly over TP ranks and GEMMs stay aligned."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def build_datasets(args, tokenizer):
    """Train and validation datasets sized for the whole run (test split unused)."""
    evals = args.train_iters // args.eval_interval + 1
    sizes = [args.train_iters * args.global_batch_size, evals * args.eval_iters * args.global_batch_size, 0]
    blend = None if args.mock_data else parse_data_path(args.data_path)
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        split=args.split,
        path_to_cache=os.path.join(default_cache_dir(args), "index-cache"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mid_level_dataset_surplus=0.005,
    )
    cls = MockGPTDataset if args.mock_data else GPTDataset
    # Built on every rank: the index files are cached, and each rank reads its own samples.
    train, valid, _ = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    if train is None or len(train) == 0:
        raise ArgumentError(f"--split {args.split} leaves no training data in --data-path {args.data_path}")
    if valid is None or len(valid) == 0:
        valid = None
    return train, valid


def get_batch(dataset, iteration: int, micro: int, args, device: torch.device) -> dict:
    """Micro-batch `micro` of global batch `iteration` for this data-parallel rank.

    Sample numbering is fixed by (iteration, micro, dp rank), so a run resumed at iteration N reads
    exactly the samples the uninterrupted run would have read. Tensors [B, S] on `device`."""
    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    mbs = args.micro_batch_size
    start = iteration * args.global_batch_size + micro * mbs * dp + rank * mbs
    items = [dataset[(start + j) % len(dataset)] for j in range(mbs)]
    batch = {}
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        batch[key] = torch.stack([torch.as_tensor(np.asarray(item[key])) for item in items]).to(device)
    batch["tokens"] = batch["tokens"].long()
    batch["labels"] = batch["labels"].long()
    batch["loss_mask"] = batch["loss_mask"].float()
    return batch
