"""Tests for the data slice: tokenizer, preprocessing CLI, data checks and the default corpus.

All data is generated under pytest's tmp_path; nothing touches the network. The small
tokenizer uses vocab 400: with byte fallback sentencepiece reserves 256 byte pieces + 4
specials + the newline piece, plus one piece per distinct character, so 300 is rejected
("Vocabulary size is smaller than required_chars. 300 vs 316") however large the input.
"""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import shutil
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402

from megatron_ext.corpus import default_corpus_path, prepare_default_data  # noqa: E402
from megatron_ext.data_checks import check_data_prefix, parse_data_path  # noqa: E402
from megatron_ext.tokenizer import SentencePieceTokenizer, train_sentencepiece  # noqa: E402
from tools.preprocess_data import main, preprocess  # noqa: E402

VOCAB = 400
DOCS = [
    {"text": "When shall we three meet again\nIn thunder, lightning, or in rain?", "title": "one"},
    {"text": "Fair is foul, and foul is fair:\nHover through the fog and filthy air.", "title": "two"},
    {"text": "  Indented line,  double  spaces,\n\nand a blank line above.", "title": "three"},
    {"text": "Café naïve — façade; 漢字 and emoji 🎭 fall back to bytes.", "title": "four"},
    {"text": "", "title": "an empty document"},
    {"text": "Tomorrow, and tomorrow, and tomorrow, creeps in this petty pace.", "title": "six"},
]


def _training_text() -> str:
    """A few kilobytes of varied English for the small test tokenizer."""
    with gzip.open(default_corpus_path(), "rt", encoding="utf-8") as f:
        scene = json.loads(f.readline())["text"]
    return scene[:20000] + "\n" + "\n".join(d["text"] for d in DOCS) + "\n"


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("tok")
    (d / "train.txt").write_text(_training_text(), encoding="utf-8")
    return train_sentencepiece([str(d / "train.txt")], str(d / "spm"), VOCAB)


@pytest.fixture(scope="module")
def tok(tok_model) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(tok_model)


def _write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return str(path)


def _read_docs(prefix: str) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    assert len(ds.document_indices) == len(ds) + 1  # one sequence per document
    return [ds[i].tolist() for i in range(len(ds))]


# -- tokenizer ----------------------------------------------------------------------------------
def test_tokenizer_properties_and_missing_model(tok, tmp_path):
    assert tok.vocab_size == VOCAB
    assert (tok.eod, tok.bos, tok.pad) == (2, 1, 3)
    assert tok.vocab["\n"] == tok.tokenize("\n")[-1] and tok.inv_vocab[tok.vocab["\n"]] == "\n"
    text = "First line\nsecond  line"
    assert tok.detokenize(tok.tokenize(text)) == text  # newlines and double spaces survive
    with pytest.raises(FileNotFoundError, match="--tokenizer-model") as exc:
        SentencePieceTokenizer(str(tmp_path / "nope.model"))
    assert "nope.model" in str(exc.value)


def test_training_is_deterministic(tmp_path):
    (tmp_path / "t.txt").write_text(_training_text(), encoding="utf-8")
    a = train_sentencepiece([str(tmp_path / "t.txt")], str(tmp_path / "a" / "m"), VOCAB)
    b = train_sentencepiece([str(tmp_path / "t.txt")], str(tmp_path / "b" / "other"), VOCAB)
    assert open(a, "rb").read() == open(b, "rb").read()


# -- preprocessing round trips -------------------------------------------------------------------
@pytest.mark.parametrize("append_eod", [True, False])
def test_jsonl_round_trip(tok, tok_model, tmp_path, append_eod):
    src = _write_jsonl(tmp_path / "in.jsonl", DOCS)
    out = preprocess(src, str(tmp_path / "out" / "ds"), tok_model, json_keys=("text", "title"), append_eod=append_eod)
    assert out == {k: str(tmp_path / "out" / f"ds_{k}_document") for k in ("text", "title")}
    for key, prefix in out.items():
        docs = _read_docs(prefix)
        assert len(docs) == len(DOCS)
        for ids, record in zip(docs, DOCS):
            if append_eod:
                assert ids[-1] == tok.eod
                ids = ids[:-1]
            assert tok.eod not in ids
            assert tok.detokenize(ids) == tok.detokenize(tok.tokenize(record[key]))
        check_data_prefix(prefix, vocab_size=VOCAB)
    assert sorted(os.listdir(tmp_path / "out")) == sorted(  # no temporary files left behind
        f"ds_{k}_document.{e}" for k in ("text", "title") for e in ("bin", "idx")
    )


def test_txt_round_trip_with_workers(tok, tok_model, tmp_path):
    lines = [d["text"].replace("\n", " ") for d in DOCS if d["text"]] * 40
    with gzip.open(tmp_path / "in.txt.gz", "wt", encoding="utf-8") as f:
        f.write("\n\n".join(lines) + "\n   \n")  # blank and whitespace-only lines are skipped
    one = preprocess(str(tmp_path / "in.txt.gz"), str(tmp_path / "w1"), tok_model)["text"]
    two = preprocess(str(tmp_path / "in.txt.gz"), str(tmp_path / "w2"), tok_model, workers=2)["text"]
    docs = _read_docs(one)
    assert len(docs) == len(lines)
    assert [tok.detokenize(d[:-1]) for d in docs] == [tok.detokenize(tok.tokenize(t)) for t in lines]
    for ext in (".bin", ".idx"):  # the worker pool keeps the input order
        assert open(one + ext, "rb").read() == open(two + ext, "rb").read()


# -- data checks ---------------------------------------------------------------------------------
@pytest.fixture()
def dataset(tok_model, tmp_path) -> str:
    src = _write_jsonl(tmp_path / "in.jsonl", DOCS * 3)
    return preprocess(src, str(tmp_path / "ds"), tok_model)["text"]


def test_check_data_prefix_errors(dataset, tmp_path):
    check_data_prefix(dataset)
    check_data_prefix(dataset, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        check_data_prefix(dataset, vocab_size=10)
    with pytest.raises(ValueError, match="without extension"):
        check_data_prefix(dataset + ".bin")

    missing = str(tmp_path / "missing")
    shutil.copy(dataset + ".idx", missing + ".idx")
    with pytest.raises(ValueError, match="--data-path") as exc:
        check_data_prefix(missing)
    assert missing + ".bin" in str(exc.value)

    short = str(tmp_path / "short")
    shutil.copy(dataset + ".idx", short + ".idx")
    with open(dataset + ".bin", "rb") as f, open(short + ".bin", "wb") as g:
        g.write(f.read()[:-2])
    with pytest.raises(ValueError, match="do not match") as exc:
        check_data_prefix(short)
    assert short + ".bin" in str(exc.value) and short + ".idx" in str(exc.value)

    garbage = str(tmp_path / "garbage")
    shutil.copy(dataset + ".bin", garbage + ".bin")
    with open(garbage + ".idx", "wb") as f:
        f.write(os.urandom(100))
    with pytest.raises(ValueError, match="not a megatron indexed-dataset index") as exc:
        check_data_prefix(garbage)
    assert garbage + ".idx" in str(exc.value)

    cut = str(tmp_path / "cut")
    shutil.copy(dataset + ".bin", cut + ".bin")
    with open(dataset + ".idx", "rb") as f, open(cut + ".idx", "wb") as g:
        g.write(f.read()[:-8])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        check_data_prefix(cut)


def test_parse_data_path():
    assert parse_data_path(["a"]) == (["a"], None)
    assert parse_data_path(["a", "b/c"]) == (["a", "b/c"], None)
    assert parse_data_path(["0.3", "a", "7", "b"]) == (["a", "b"], [0.3, 7.0])
    assert parse_data_path(["1e-1", "a"]) == (["a"], [0.1])
    for bad, msg in [
        ([], "at least one"),
        (["0.5", "a", "0.5"], "no partner"),
        (["0.5", "a", "b", "c"], "should be a weight"),
        (["0.5", "1", "0.5", "a"], "should be a dataset prefix"),
        (["a", "0.5"], "mixes paths and numbers"),
        (["-1", "a"], "finite number"),
        (["nan", "a"], "finite number"),
        (["0", "a", "0", "b"], "all zero"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_data_path(bad)


# -- CLI errors ----------------------------------------------------------------------------------
def _cli(tmp_path, tok_model, *extra, src=None) -> list[str]:
    src = src or _write_jsonl(tmp_path / "in.jsonl", DOCS)
    return ["--input", src, "--output-prefix", str(tmp_path / "cli"), "--tokenizer-model", tok_model, *extra]


def test_cli_refuses_bad_tokenizer_type_and_existing_outputs(tok_model, tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(_cli(tmp_path, tok_model, "--tokenizer-type", "GPT2BPETokenizer"))
    assert str(exc.value).startswith("error:") and "SentencePieceTokenizer" in str(exc.value)

    out = main(_cli(tmp_path, tok_model, "--append-eod", "--tokenizer-type", "SentencePieceTokenizer"))
    with pytest.raises(SystemExit, match="--overwrite") as exc:
        main(_cli(tmp_path, tok_model))
    assert out["text"] + ".bin" in str(exc.value)
    assert main(_cli(tmp_path, tok_model, "--overwrite")) == out
    # Keep the dataset referenced while reading its arrays: they are views of an mmap that
    # IndexedDataset.__del__ closes, and touching them afterwards segfaults.
    ds = IndexedDataset(out["text"])
    assert ds[0][-1] != 2  # the re-run without --append-eod replaced the files


def test_cli_input_errors(tok_model, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": broken}\n', encoding="utf-8")
    cases = [
        (_cli(tmp_path, tok_model, src=str(bad)), r"bad.jsonl:3: invalid JSON"),
        (_cli(tmp_path, tok_model, "--json-keys", "body"), r"in.jsonl:1: missing key 'body'"),
        (_cli(tmp_path, tok_model, src=str(tmp_path / "absent.jsonl")), "input file not found"),
        (_cli(tmp_path, str(tmp_path / "absent.model")), "--tokenizer-model"),
        (_cli(tmp_path, tok_model, src=str(tmp_path / "in.csv")), "unsupported input"),
    ]
    (tmp_path / "in.csv").write_text("x\n")
    for argv, msg in cases:
        with pytest.raises(SystemExit, match=msg) as exc:
            main(argv)
        assert str(exc.value).startswith("error: ")
    assert not list(tmp_path.glob("cli*"))  # nothing written by failed runs


def test_cli_trains_tokenizer(tmp_path):
    records = [{"text": line} for line in _training_text().splitlines() if line.strip()]
    model = str(tmp_path / "new" / "spm.model")
    out = main(_cli(tmp_path, model, "--train-tokenizer-vocab-size", str(VOCAB), "--append-eod",
                    src=_write_jsonl(tmp_path / "train.jsonl", records)))
    assert SentencePieceTokenizer(model).vocab_size == VOCAB
    assert len(IndexedDataset(out["text"])) == len(records)


# -- default corpus ------------------------------------------------------------------------------
def _prepare_in_child(cache_dir, barrier, queue):
    barrier.wait()
    queue.put(prepare_default_data(cache_dir))


def test_prepare_default_data(tmp_path):
    with gzip.open(default_corpus_path(), "rt", encoding="utf-8") as f:
        n_scenes = sum(1 for _ in f)
    cache = str(tmp_path / "cache")
    prefix, model = prepare_default_data(cache)
    tok = SentencePieceTokenizer(model)
    assert tok.vocab_size == 4096
    check_data_prefix(prefix, vocab_size=tok.vocab_size)
    ds = IndexedDataset(prefix)
    assert len(ds) == n_scenes and ds[0][-1] == tok.eod
    assert tok.detokenize(ds[0][:4]).startswith("ACT I")

    start = time.time()
    assert prepare_default_data(cache) == (prefix, model)
    assert time.time() - start < 1.0
    assert os.listdir(cache) == [os.path.basename(os.path.dirname(prefix))]


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork")
def test_prepare_default_data_concurrent(tmp_path):
    ctx = multiprocessing.get_context("fork")
    barrier, queue, cache = ctx.Barrier(2), ctx.Queue(), str(tmp_path / "cache")
    procs = [ctx.Process(target=_prepare_in_child, args=(cache, barrier, queue)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1]
    assert len(os.listdir(cache)) == 1  # the loser's temporary directory was removed
    check_data_prefix(results[0][0], vocab_size=4096)
