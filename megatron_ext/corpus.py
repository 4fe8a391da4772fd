"""The bundled default corpus (Shakespeare, see data_files/NOTICE.md) and its preparation.

``prepare_default_data(cache_dir)`` turns the shipped ``shakespeare.jsonl.gz`` into what
training needs, a SentencePiece model and a megatron indexed dataset, so a run can start with
no data set and no network::

    data_prefix, tokenizer_model = prepare_default_data("~/.cache/nsmla")
    # --data-path data_prefix --tokenizer-model tokenizer_model

The result lives in ``cache_dir/shakespeare-spm<vocab>-<corpus hash>/`` and is reused by later
calls. Several processes (e.g. every rank of a job) may call it at once: each builds in its own
temporary directory and renames it into place; a rename that loses the race is discarded and
the winner's directory used. Tokenizer training and preprocessing are deterministic, so all
contenders produce identical files anyway.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time

CORPUS_NAME = "shakespeare"
_CORPUS_FILE = "shakespeare.jsonl.gz"
_DATA_PREFIX = f"{CORPUS_NAME}_text_document"  # what preprocess() names the "text" key output
_TOKENIZER_FILE = "tokenizer.model"
_DONE_FILE = "metadata.json"  # written last; its presence marks a complete directory


def default_corpus_path() -> str:
    """Path of the bundled ``shakespeare.jsonl.gz`` (one JSON object per scene)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data_files", _CORPUS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"bundled corpus missing: {path}; rebuild it with tools/build_default_corpus.py "
            "(see megatron_ext/data_files/NOTICE.md)"
        )
    return path


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _outputs(directory: str) -> tuple[str, str]:
    return os.path.join(directory, _DATA_PREFIX), os.path.join(directory, _TOKENIZER_FILE)


def _is_complete(directory: str) -> bool:
    prefix, model = _outputs(directory)
    return all(
        os.path.isfile(p)
        for p in (prefix + ".bin", prefix + ".idx", model, os.path.join(directory, _DONE_FILE))
    )


def prepare_default_data(cache_dir: str, vocab_size: int = 4096) -> tuple[str, str]:
    """Build (once) the tokenizer and indexed dataset of the bundled corpus.

    Args:
        cache_dir: where to keep the results; created if missing.
        vocab_size: SentencePiece vocabulary size to train.

    Returns:
        ``(data_prefix, tokenizer_model_path)``: the prefix for ``--data-path`` and the
        ``.model`` file for ``--tokenizer-model``.
    """
    corpus = default_corpus_path()
    digest = _file_digest(corpus)  # a changed corpus file gets a fresh directory
    cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    final_dir = os.path.join(cache_dir, f"{CORPUS_NAME}-spm{vocab_size}-{digest[:12]}")
    if _is_complete(final_dir):
        return _outputs(final_dir)
    if os.path.exists(final_dir):
        raise RuntimeError(
            f"{final_dir} exists but is incomplete (no {_DONE_FILE}); it was not made by "
            "prepare_default_data. Delete it and call again."
        )

    # Imported here so that merely locating the corpus does not import megatron-core.
    from tools.preprocess_data import preprocess

    os.makedirs(cache_dir, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(final_dir)}.tmp", dir=cache_dir)
    try:
        start = time.time()
        work_prefix, work_model = _outputs(work_dir)
        preprocess(
            corpus,
            os.path.join(work_dir, CORPUS_NAME),
            work_model,
            json_keys=("text",),
            append_eod=True,
            workers=1,
            train_vocab_size=vocab_size,
            log_interval=0,
        )
        with open(os.path.join(work_dir, _DONE_FILE), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "corpus": _CORPUS_FILE,
                    "corpus_sha256": digest,
                    "vocab_size": vocab_size,
                    "data_prefix": _DATA_PREFIX,
                    "tokenizer_model": _TOKENIZER_FILE,
                    "build_seconds": round(time.time() - start, 2),
                },
                f,
                indent=2,
            )
        os.chmod(work_dir, 0o755)  # mkdtemp makes it owner-only; the cache may be shared
        try:
            # Atomic on POSIX: the directory appears complete or not at all.
            os.rename(work_dir, final_dir)
        except OSError as exc:
            # Another process renamed its copy first (ENOTEMPTY/EEXIST): use the winner's.
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not _is_complete(final_dir):
                raise
    finally:
        if os.path.isdir(work_dir):
            shutil.rmtree(work_dir, ignore_errors=True)
    return _outputs(final_dir)
