"""Tokenize a text corpus into megatron-core indexed datasets (``.bin``/``.idx`` pairs).

A Megatron-LM compatible subset of ``tools/preprocess_data.py``::

    python -m tools.preprocess_data --input corpus.jsonl --json-keys text \\
        --output-prefix data/corpus --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model data/spm.model --append-eod --workers 4

writes ``data/corpus_text_document.bin`` and ``.idx``, the prefix ``data/corpus_text_document``
being what ``--data-path`` takes. Inputs:

* ``.jsonl`` / ``.json`` / ``.jsonl.gz``: one JSON object per line; each ``--json-keys`` key
  must hold a string and becomes its own dataset (one document per line).
* ``.txt`` / ``.txt.gz``: every non-empty line is one document (one key only).

Each output file is first written under a temporary name and renamed when complete, so a crash
never leaves a half-written file under a final name. Existing outputs are only replaced with
``--overwrite``. Any input error stops the run with a single ``error: ...`` line.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import multiprocessing
import os
import sys
import tempfile
import time
from typing import Iterator, Sequence

VALID_TOKENIZER_TYPES = ("SentencePieceTokenizer",)


class PreprocessError(SystemExit):
    """An input or usage error: exits the CLI with one ``error: ...`` message."""

    def __init__(self, message: str) -> None:
        super().__init__(f"error: {message}")


def _open_text(path: str):
    """Open a (possibly gzip-compressed) UTF-8 text file."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _input_kind(path: str) -> str:
    """'jsonl' or 'txt', from the file name (a trailing .gz is ignored)."""
    base = path[:-3] if path.endswith(".gz") else path
    if base.endswith((".jsonl", ".json")):
        return "jsonl"
    if base.endswith(".txt"):
        return "txt"
    raise PreprocessError(
        f"unsupported input {path}: expected .jsonl, .json, .txt (optionally .gz-compressed)"
    )


def iter_records(path: str, json_keys: Sequence[str]) -> Iterator[tuple[str, ...]]:
    """Yield, per document, the texts of ``json_keys`` (in that order), validating as we go."""
    if not os.path.isfile(path):
        raise PreprocessError(f"input file not found: {path} (--input)")
    kind = _input_kind(path)
    if kind == "txt" and len(json_keys) != 1:
        raise PreprocessError(f"a .txt input holds one text per line; give one --json-keys, not {list(json_keys)}")
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, start=1):
                if kind == "txt":
                    if line.strip():
                        yield (line.rstrip("\r\n"),)
                    continue
                if not line.strip():
                    continue  # tolerate blank lines (e.g. a trailing newline) in JSONL
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise PreprocessError(f"{path}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(obj, dict):
                    raise PreprocessError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                texts = []
                for key in json_keys:
                    if key not in obj:
                        raise PreprocessError(
                            f"{path}:{lineno}: missing key {key!r} (the object has keys {sorted(obj)}; "
                            "choose with --json-keys)"
                        )
                    if not isinstance(obj[key], str):
                        raise PreprocessError(f"{path}:{lineno}: key {key!r} holds {type(obj[key]).__name__}, not a string")
                    texts.append(obj[key])
                yield tuple(texts)
    except UnicodeDecodeError as exc:
        raise PreprocessError(f"{path} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except (OSError, EOFError) as exc:  # e.g. a corrupt .gz
        raise PreprocessError(f"cannot read {path}: {exc}") from None


# -- encoding (runs in worker processes when --workers > 1) -------------------------------------
_TOKENIZER = None
_APPEND_EOD = False


def _init_worker(tokenizer_model: str, append_eod: bool) -> None:
    global _TOKENIZER, _APPEND_EOD
    from megatron_ext.tokenizer import SentencePieceTokenizer

    _TOKENIZER = SentencePieceTokenizer(tokenizer_model)
    _APPEND_EOD = append_eod


def _encode(texts: tuple[str, ...]) -> tuple[list[list[int]], int]:
    """Token ids for each text of one record (+ EOD if asked) and the record's UTF-8 size."""
    out = []
    for text in texts:
        ids = _TOKENIZER.tokenize(text)
        if _APPEND_EOD:
            ids.append(_TOKENIZER.eod)
        out.append(ids)
    return out, sum(len(t.encode("utf-8")) for t in texts)


def _encode_all(records, tokenizer_model: str, append_eod: bool, workers: int, chunk: int = 512):
    """Encode records in input order, in process or with a pool of ``workers`` processes.

    Records are read (and validated) in this process, so input errors surface here with their
    line number; the pool only tokenizes. While the pool encodes one chunk, the next is read.
    """
    if workers == 1:
        _init_worker(tokenizer_model, append_eod)
        yield from map(_encode, records)
        return
    # fork: workers inherit the already-imported modules (a fresh interpreter would spend
    # seconds importing megatron-core); they only run sentencepiece.
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with multiprocessing.get_context(method).Pool(
        workers, initializer=_init_worker, initargs=(tokenizer_model, append_eod)
    ) as pool:  # leaving the block terminates the workers, also on errors
        batch = list(itertools.islice(records, chunk))
        while batch:
            pending = pool.map_async(_encode, batch, chunksize=max(1, chunk // (4 * workers)))
            batch = list(itertools.islice(records, chunk))
            yield from pending.get()


def _train_tokenizer(input_path: str, json_keys: Sequence[str], model_path: str, vocab_size: int) -> None:
    """Train the sentencepiece model at ``model_path`` from the input's texts."""
    from megatron_ext.tokenizer import train_sentencepiece

    if not model_path.endswith(".model"):
        raise PreprocessError(f"--tokenizer-model must end in .model to be trained, got {model_path}")
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    fd, text_path = tempfile.mkstemp(suffix=".txt", dir=os.path.dirname(os.path.abspath(model_path)))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for texts in iter_records(input_path, json_keys):
                for text in texts:
                    f.write(text.rstrip("\n") + "\n")
        train_sentencepiece([text_path], model_path[: -len(".model")], vocab_size)
    except ValueError as exc:
        raise PreprocessError(str(exc)) from None
    finally:
        os.unlink(text_path)


def preprocess(
    input_path: str,
    output_prefix: str,
    tokenizer_model: str,
    json_keys: Sequence[str] = ("text",),
    append_eod: bool = True,
    workers: int = 1,
    train_vocab_size: int | None = None,
    overwrite: bool = False,
    log_interval: int = 10000,
) -> dict[str, str]:
    """Tokenize ``input_path`` into one indexed dataset per key.

    Returns ``{key: prefix}`` where ``prefix`` (``{output_prefix}_{key}_document``) is the
    path without ``.bin``/``.idx``, as ``--data-path`` expects. Raises ``PreprocessError`` (a
    ``SystemExit`` whose text starts with ``error:``) on bad input or existing outputs.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from megatron_ext.tokenizer import SentencePieceTokenizer

    json_keys = list(json_keys)
    if not json_keys or len(set(json_keys)) != len(json_keys):
        raise PreprocessError(f"--json-keys must name distinct keys, got {json_keys}")
    if workers < 1:
        raise PreprocessError(f"--workers must be >= 1, got {workers}")
    if not os.path.isfile(input_path):
        raise PreprocessError(f"input file not found: {input_path} (--input)")
    prefixes = {key: f"{output_prefix}_{key}_document" for key in json_keys}
    for prefix in prefixes.values():
        for path in (prefix + ".bin", prefix + ".idx"):
            if os.path.exists(path) and not overwrite:
                raise PreprocessError(f"output file {path} already exists; pass --overwrite to replace it")

    if train_vocab_size is not None and not os.path.exists(tokenizer_model):
        print(f"training a {train_vocab_size}-piece sentencepiece model at {tokenizer_model}", file=sys.stderr)
        _train_tokenizer(input_path, json_keys, tokenizer_model, train_vocab_size)
    try:
        tokenizer = SentencePieceTokenizer(tokenizer_model)
    except FileNotFoundError as exc:
        raise PreprocessError(str(exc)) from None
    if train_vocab_size is not None and tokenizer.vocab_size != train_vocab_size:
        print(f"note: using the existing {tokenizer_model} (vocab {tokenizer.vocab_size}), "
              f"not training one of {train_vocab_size}", file=sys.stderr)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)

    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    tmp_prefixes = {key: f"{p}.tmp{os.getpid()}" for key, p in prefixes.items()}
    builders = {key: IndexedDatasetBuilder(p + ".bin", dtype=dtype) for key, p in tmp_prefixes.items()}
    encoded = _encode_all(iter_records(input_path, json_keys), tokenizer_model, append_eod, workers)
    try:
        start, n_docs, n_bytes = time.time(), 0, 0
        for docs, size in encoded:
            for key, ids in zip(json_keys, docs):
                # One sequence per document (Megatron-LM without --split-sentences); the
                # builder converts the id list to the dataset dtype.
                builders[key].add_document(ids, [len(ids)])
            n_docs, n_bytes = n_docs + 1, n_bytes + size
            if log_interval and n_docs % log_interval == 0:
                elapsed = time.time() - start
                print(f"processed {n_docs} documents ({n_bytes / 2**20 / max(elapsed, 1e-9):.1f} MiB/s)", file=sys.stderr)
        if n_docs == 0:
            raise PreprocessError(f"no documents found in {input_path}")
        for key, builder in builders.items():
            builder.finalize(tmp_prefixes[key] + ".idx")
        # .bin first: once a final .idx exists its .bin is complete.
        for key, tmp in tmp_prefixes.items():
            os.replace(tmp + ".bin", prefixes[key] + ".bin")
            os.replace(tmp + ".idx", prefixes[key] + ".idx")
    finally:
        encoded.close()  # stops the worker pool now, also when we leave early on an error
        for key, tmp in tmp_prefixes.items():
            builders[key].data_file.close()
            for path in (tmp + ".bin", tmp + ".idx"):
                if os.path.exists(path):
                    os.unlink(path)
    print(f"wrote {n_docs} documents to {', '.join(p + '.bin/.idx' for p in prefixes.values())}", file=sys.stderr)
    return prefixes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, help=".jsonl[.gz] (one JSON object per line) or .txt[.gz] (one document per line)")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="JSON keys to tokenize (default: text)")
    parser.add_argument("--output-prefix", required=True, help="writes {prefix}_{key}_document.bin/.idx")
    parser.add_argument("--tokenizer-type", default="SentencePieceTokenizer", help=f"one of {', '.join(VALID_TOKENIZER_TYPES)}")
    parser.add_argument("--tokenizer-model", required=True, help="SentencePiece .model path")
    parser.add_argument("--train-tokenizer-vocab-size", type=int, default=None, metavar="N",
                        help="train an N-piece model at --tokenizer-model from the input if it does not exist")
    parser.add_argument("--append-eod", action="store_true", help="append the EOD token to every document")
    parser.add_argument("--workers", type=int, default=1, help="encoding processes (1 = in process)")
    parser.add_argument("--log-interval", type=int, default=10000, help="report progress every N documents")
    parser.add_argument("--overwrite", action="store_true", help="replace existing output files")
    return parser


def main(argv: list[str] | None = None) -> dict[str, str]:
    args = build_parser().parse_args(argv)
    if args.tokenizer_type not in VALID_TOKENIZER_TYPES:
        raise PreprocessError(
            f"unsupported --tokenizer-type {args.tokenizer_type!r}; valid values: {', '.join(VALID_TOKENIZER_TYPES)}"
        )
    return preprocess(
        args.input, args.output_prefix, args.tokenizer_model, json_keys=args.json_keys,
        append_eod=args.append_eod, workers=args.workers, train_vocab_size=args.train_tokenizer_vocab_size,
        overwrite=args.overwrite, log_interval=args.log_interval,
    )


if __name__ == "__main__":
    # Run as a script (python tools/preprocess_data.py): make the repository root importable.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
