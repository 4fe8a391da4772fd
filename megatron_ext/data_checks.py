"""Fail-fast checks on ``--data-path`` arguments, run before any training starts.

megatron-core reports a broken dataset late (after model construction, often on one rank)
and tersely ("bad header, cannot read", a bare numpy error on a short ``.bin``). These checks
read only the ``.idx`` file and the ``.bin`` file's size, and say which file is wrong and why.

The ``.idx`` format (megatron/core/datasets/indexed_dataset.py, ``_IndexWriter``), all
little-endian::

    9 bytes  magic  b"MMIDIDX\\x00\\x00"
    u64      version, always 1
    u8       dtype code of the tokens in the .bin (DType enum: 8 = uint16, 4 = int32, ...)
    u64      S, number of sequences
    u64      D, number of document boundaries (= documents + 1, it starts with a 0)
    S x i32  sequence lengths (tokens)
    S x i64  sequence byte offsets into the .bin
    D x i64  document boundaries (sequence indices; first 0, last S)
    S x i8   sequence modes (multimodal datasets only)
"""

from __future__ import annotations

import math
import os
import struct

import numpy

_MAGIC = b"MMIDIDX\x00\x00"  # private in megatron-core (_INDEX_HEADER); the format is fixed
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, doc count


def _dtype_from_code(code: int, idx_path: str):
    """numpy dtype for an index dtype code, per megatron-core's ``DType`` enum."""
    # Imported here: megatron-core takes seconds to import, and parse_data_path (used while
    # parsing arguments) should not pay for it.
    from megatron.core.datasets.indexed_dataset import DType

    try:
        return numpy.dtype(DType.dtype_from_code(code))
    except ValueError:
        valid = ", ".join(f"{d.value}={d.name}" for d in DType)
        raise ValueError(f"{idx_path}: unknown token dtype code {code} (valid: {valid})") from None


def check_data_prefix(prefix: str, vocab_size: int | None = None, sample_tokens: int = 1 << 20) -> None:
    """Verify that ``prefix.bin``/``prefix.idx`` form a readable megatron indexed dataset.

    Checks: both files exist; the ``.idx`` header and size are consistent; document boundaries
    are sane; the ``.bin`` size equals the token count times the dtype size; and, given
    ``vocab_size``, that the dtype can hold every id and that up to ``sample_tokens`` ids read
    from evenly spaced places in the ``.bin`` are in ``[0, vocab_size)``.

    Raises:
        ValueError: naming the offending file(s) and what is wrong.
    """
    if prefix.endswith((".bin", ".idx")):
        raise ValueError(f"--data-path takes the prefix without extension: use {prefix[:-4]!r}, not {prefix!r}")
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise ValueError(
                f"data file {path} not found (from --data-path {prefix}); create it with "
                "tools/preprocess_data.py or fix the path"
            )

    idx_size = os.path.getsize(idx_path)
    if idx_size < _HEADER.size:
        raise ValueError(f"{idx_path} is not a megatron indexed-dataset index: only {idx_size} bytes")
    with open(idx_path, "rb") as f:
        magic, version, code, n_seq, n_doc = _HEADER.unpack(f.read(_HEADER.size))
    if magic != _MAGIC:
        raise ValueError(f"{idx_path} is not a megatron indexed-dataset index (bad magic {magic!r})")
    if version != 1:
        raise ValueError(f"{idx_path}: unsupported index version {version} (megatron-core reads 1)")
    dtype = _dtype_from_code(code, idx_path)
    plain = _HEADER.size + 12 * n_seq + 8 * n_doc  # lengths + pointers + document boundaries
    if idx_size not in (plain, plain + n_seq):  # + one mode byte per sequence if multimodal
        raise ValueError(
            f"{idx_path} is truncated or corrupt: header says {n_seq} sequences and {n_doc - 1} "
            f"documents, which needs {plain} bytes, but the file has {idx_size}"
        )

    mm = numpy.memmap(idx_path, mode="r", dtype=numpy.uint8)
    try:
        lengths = numpy.frombuffer(mm, dtype=numpy.int32, count=n_seq, offset=_HEADER.size)
        pointers = numpy.frombuffer(mm, dtype=numpy.int64, count=n_seq, offset=_HEADER.size + 4 * n_seq)
        docs = numpy.frombuffer(mm, dtype=numpy.int64, count=n_doc, offset=_HEADER.size + 12 * n_seq)
        if n_doc < 1 or docs[0] != 0 or docs[-1] != n_seq or numpy.any(numpy.diff(docs) < 0):
            raise ValueError(f"{idx_path} is corrupt: document boundaries must rise from 0 to {n_seq}")
        if n_seq and lengths.min() < 0:
            raise ValueError(f"{idx_path} is corrupt: negative sequence length")
        total_tokens = int(lengths.sum(dtype=numpy.int64))
        # The reader trusts the stored pointers, so the last one must match the lengths too.
        end = int(pointers[-1]) + int(lengths[-1]) * dtype.itemsize if n_seq else 0
    finally:
        del mm
    expected = total_tokens * dtype.itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size != expected or end != expected:
        raise ValueError(
            f"{bin_path} and {idx_path} do not match: the index describes {total_tokens} "
            f"{dtype.name} tokens ({expected} bytes) but the .bin has {bin_size} bytes; they "
            "come from different or interrupted preprocessing runs, so regenerate both"
        )

    if vocab_size is None:
        return
    if dtype.kind not in "iu":
        raise ValueError(f"{idx_path}: token dtype {dtype.name} is not an integer type")
    if vocab_size - 1 > numpy.iinfo(dtype).max:
        raise ValueError(
            f"{idx_path}: token dtype {dtype.name} cannot hold ids up to {vocab_size - 1} "
            f"(vocab size {vocab_size}); re-run preprocessing with this tokenizer"
        )
    if total_tokens == 0:
        return
    tokens = numpy.memmap(bin_path, mode="r", dtype=dtype)
    try:
        n_chunks, chunk = 16, max(1, sample_tokens // 16)
        starts = numpy.linspace(0, max(0, total_tokens - chunk), n_chunks).astype(numpy.int64)
        sample = numpy.concatenate([tokens[s : s + chunk] for s in numpy.unique(starts)])
        low, high = int(sample.min()), int(sample.max())
    finally:
        del tokens
    if low < 0 or high >= vocab_size:
        raise ValueError(
            f"{bin_path} holds token id {high if high >= vocab_size else low}, outside the "
            f"tokenizer's vocabulary [0, {vocab_size}); it was preprocessed with another tokenizer"
        )


def _as_weight(token: str) -> float | None:
    """The token as a float, or None if it is not a number."""
    try:
        return float(token)
    except ValueError:
        return None


def parse_data_path(tokens: list[str]) -> tuple[list[str], list[float] | None]:
    """Parse Megatron's ``--data-path`` values: ``p1 p2 ...`` or ``w1 p1 w2 p2 ...``.

    Returns ``(prefixes, weights)``; ``weights`` is None for the unweighted form and is not
    normalised (megatron-core normalises blend weights itself).

    Raises:
        ValueError: for an empty list, a dangling weight, a missing weight, a weight that is
            negative or not finite, all-zero weights, or numbers mixed into a list of paths.
    """
    tokens = list(tokens)
    if not tokens:
        raise ValueError("--data-path needs at least one dataset prefix")
    weights = [_as_weight(t) for t in tokens]
    if weights[0] is None:  # unweighted: every token must be a path
        numeric = [t for t, w in zip(tokens, weights) if w is not None]
        if numeric:
            raise ValueError(
                f"--data-path mixes paths and numbers ({', '.join(numeric)}); use either "
                "'PREFIX1 PREFIX2 ...' or 'WEIGHT1 PREFIX1 WEIGHT2 PREFIX2 ...'"
            )
        return tokens, None
    if len(tokens) % 2:
        raise ValueError(
            f"--data-path weighted form needs WEIGHT PREFIX pairs, got {len(tokens)} values "
            f"(the last, {tokens[-1]!r}, has no partner)"
        )
    prefixes, values = tokens[1::2], weights[0::2]
    for i in range(0, len(tokens), 2):
        if weights[i] is None:
            raise ValueError(f"--data-path value {i + 1} ({tokens[i]!r}) should be a weight before prefix {tokens[i + 1]!r}")
        if weights[i + 1] is not None:
            raise ValueError(f"--data-path value {i + 2} ({tokens[i + 1]!r}) should be a dataset prefix, not a number")
        if not math.isfinite(weights[i]) or weights[i] < 0:
            raise ValueError(f"--data-path weight {tokens[i]!r} must be a finite number >= 0")
    if not any(values):
        raise ValueError("--data-path weights are all zero")
    return prefixes, values
