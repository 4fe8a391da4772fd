"""SentencePiece tokenizer for nsmla, plus a deterministic trainer for it.

``SentencePieceTokenizer`` implements megatron-core's (legacy) tokenizer interface, which is
what ``GPTDatasetConfig.tokenizer`` duck-types against: ``vocab_size``, ``eod`` and ``pad``
are read by the datasets, ``tokenize``/``detokenize`` by the preprocessing tools.

Note on the base class: the brief named ``megatron.core.datasets.megatron_tokenizer.
MegatronTokenizer``, but in megatron-core 0.16.1 that module only defines
``MegatronLegacyTokenizer`` (the new ``megatron.core.tokenizers.MegatronTokenizer`` is a
factory that needs a metadata JSON next to the model), so we subclass the legacy class.

Models trained by ``train_sentencepiece`` keep newlines: ``"\\n"`` is a user-defined piece
and extra whitespace is not collapsed, so play text keeps its verse-line structure through
tokenize/detokenize. (A stock sentencepiece model would turn every newline into a space.)
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm
from megatron.core.datasets.megatron_tokenizer import MegatronLegacyTokenizer

# Special ids of models trained here; pad gets its own id so megatron-core's pad/eod
# collision check (MegatronDataset) stays quiet and loss masking of pads is exact.
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
# Lines longer than this (bytes) are skipped by the sentencepiece trainer; the default 4192
# would silently drop long one-document-per-line paragraphs.
_MAX_SENTENCE_BYTES = 1 << 16


@contextlib.contextmanager
def _quiet_legacy_warning() -> Iterator[None]:
    """Drop the 'legacy tokenizer system is deprecated' warning megatron-core logs per instance.

    It would be printed once per preprocessing worker and says nothing actionable here.
    """
    logger = logging.getLogger("megatron.core.datasets.megatron_tokenizer")

    def _filter(record: logging.LogRecord) -> bool:
        return "legacy tokenizer system" not in record.getMessage()

    logger.addFilter(_filter)
    try:
        yield
    finally:
        logger.removeFilter(_filter)


class SentencePieceTokenizer(MegatronLegacyTokenizer):
    """A megatron-core tokenizer backed by a SentencePiece ``.model`` file.

    Args:
        model_path: path of the SentencePiece model (``--tokenizer-model``).
    """

    def __init__(self, model_path: str) -> None:
        if not os.path.isfile(model_path):
            raise FileNotFoundError(
                f"SentencePiece tokenizer model not found: {model_path!r}. Pass an existing "
                "'.model' file with --tokenizer-model (tools/preprocess_data.py can train one "
                "with --train-tokenizer-vocab-size N)."
            )
        with _quiet_legacy_warning():
            super().__init__(model_path)
        self.model_path = model_path
        self._sp = spm.SentencePieceProcessor(model_file=model_path)
        self._vocab: dict[str, int] | None = None
        self._inv_vocab: dict[int, str] | None = None

    # -- encoding ---------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Encode ``text`` into token ids (no BOS/EOS added)."""
        return self._sp.encode(text, out_type=int)

    def detokenize(self, ids: Sequence[int]) -> str:
        """Decode token ids back into text (numpy arrays and tensors are accepted)."""
        return self._sp.decode([int(i) for i in ids])

    # -- vocabulary ---------------------------------------------------------------------------
    @property
    def vocab(self) -> dict[str, int]:
        """Mapping piece -> id (built once, on first use)."""
        if self._vocab is None:
            self._vocab = {self._sp.id_to_piece(i): i for i in range(self.vocab_size)}
        return self._vocab

    @property
    def inv_vocab(self) -> dict[int, str]:
        """Mapping id -> piece."""
        if self._inv_vocab is None:
            self._inv_vocab = {i: self._sp.id_to_piece(i) for i in range(self.vocab_size)}
        return self._inv_vocab

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    # -- special tokens -----------------------------------------------------------------------
    @property
    def eod(self) -> int:
        """End-of-document id: the model's EOS piece."""
        eos = self._sp.eos_id()
        if eos < 0:
            raise ValueError(
                f"SentencePiece model {self.model_path} has no EOS piece, which nsmla uses as "
                "the end-of-document token; train it with eos_id set (train_sentencepiece does)."
            )
        return eos

    @property
    def eos(self) -> int:
        return self.eod

    @property
    def bos(self) -> int:
        """BOS id, or -1 if the model has none (sentencepiece's convention)."""
        return self._sp.bos_id()

    @property
    def pad(self) -> int:
        """Pad id; falls back to the EOD id for models trained without a pad piece."""
        pad = self._sp.pad_id()
        return pad if pad >= 0 else self.eod

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def _iter_training_lines(input_files: Iterable[str]) -> Iterator[str]:
    """Yield the non-empty lines of plain-text files (sentencepiece trains line by line)."""
    for path in input_files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line


def train_sentencepiece(
    input_files: list[str], model_prefix: str, vocab_size: int, model_type: str = "bpe"
) -> str:
    """Train a SentencePiece model on plain-text files and return the ``.model`` path.

    The model gets unk=0, bos=1, eos=2, pad=3, byte fallback (no unknown tokens for unseen
    characters) and a ``"\\n"`` piece. Training is deterministic: two runs on the same input
    give byte-identical files. Two things make that hold: ``num_threads=1``, and feeding the
    text through ``sentence_iterator``/``model_writer`` instead of ``input=``/``model_prefix=``,
    because sentencepiece records those two paths in the model's ``trainer_spec`` (a model
    trained in a temporary directory would otherwise differ from one trained in place). All
    lines are used (no random sampling); pre-sample very large corpora yourself.

    Only the ``.model`` file is written (no ``.vocab``); it is written to a temporary name
    and renamed, so an interrupted training never leaves a truncated model behind.
    """
    if not input_files:
        raise ValueError("train_sentencepiece needs at least one input file")
    missing = [p for p in input_files if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"tokenizer training input not found: {', '.join(missing)}")
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    model_path = model_prefix + ".model"
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_iter_training_lines(input_files),
            model_writer=buffer,
            vocab_size=vocab_size,
            model_type=model_type,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=PAD_ID,
            byte_fallback=True,
            user_defined_symbols=["\n"],
            remove_extra_whitespaces=False,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            num_threads=1,
            minloglevel=2,  # only errors; the trainer is very chatty on stderr otherwise
        )
    except RuntimeError as exc:
        # e.g. "Vocabulary size is too high (N). Please set it to a value <= M." on tiny inputs
        raise ValueError(
            f"sentencepiece training ({model_type}, vocab_size={vocab_size}) on "
            f"{', '.join(input_files)} failed: {exc}"
        ) from exc
    os.makedirs(os.path.dirname(os.path.abspath(model_path)), exist_ok=True)
    tmp_path = f"{model_path}.tmp{os.getpid()}"
    with open(tmp_path, "wb") as f:
        f.write(buffer.getvalue())
    os.replace(tmp_path, model_path)
    return model_path
