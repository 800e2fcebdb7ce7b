#!/usr/bin/env python
"""Derive the CLIP BPE tokenizer files that ddsedit ships, from OpenAI's BPE merge list.

Stable Diffusion 1.x (OpenAI CLIP ViT-L/14) and 2.x (OpenCLIP ViT-H/14) use the same byte-level
BPE tokenizer. Its only data is the merge list ``bpe_simple_vocab_16e6.txt.gz`` that OpenAI
published with CLIP (MIT license); the ``open_clip_torch`` wheel on PyPI carries a copy. The
Hugging Face ``vocab.json`` / ``merges.txt`` pair is a pure function of that list:

* merges: lines 1 .. 48894 of the file (line 0 is a header), i.e. the first 48894 merges;
* vocab, in id order: the 256 byte symbols (GPT-2's byte-to-unicode table, in its order), the
  same 256 symbols followed by ``</w>``, every merge's two halves joined, then
  ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49408 entries in all.

This script writes them gzipped (deterministically: no timestamp or name in the gzip header) as
``src/ddsedit/model_configs/clip_bpe/{vocab.json.gz,merges.txt.gz}`` and checks the result
against token ids known from the reference tokenizer.

Usage, with network access to PyPI only::

    pip download --no-deps open_clip_torch -d /tmp/open_clip
    python scripts/make_clip_bpe.py /tmp/open_clip/open_clip_torch-*.whl

The source may be the wheel, the ``.txt.gz`` file itself, or omitted when ``open_clip`` (or
OpenAI's ``clip``) is installed.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import io
import json
import sys
import zipfile
from pathlib import Path

MERGES_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # CLIP's vocabulary size minus the byte symbols and the two specials
VOCAB_SIZE = 49408
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "src" / "ddsedit" / "model_configs" / "clip_bpe"
# "a photo of a cat" as the reference tokenizers (openai/clip-vit-large-patch14, SD 1.x/2.x) encode it.
KNOWN_IDS = {"a photo of a cat": [49406, 320, 1125, 539, 320, 2368, 49407]}


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes 0..255, in the order their vocabulary ids follow.

    Bytes that are printable Latin-1 characters stand for themselves and come first; the others
    are mapped, in byte order, to the code points from U+0100 on.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\N{INVERTED EXCLAMATION MARK}"), ord("\N{NOT SIGN}") + 1),
        *range(ord("\N{REGISTERED SIGN}"), ord("\N{LATIN SMALL LETTER Y WITH DIAERESIS}") + 1),
    ]
    taken = set(printable)
    others = [byte for byte in range(256) if byte not in taken]
    return [chr(byte) for byte in printable] + [chr(256 + index) for index in range(len(others))]


def read_merge_lines(source: Path | None) -> list[str]:
    """The raw lines of ``bpe_simple_vocab_16e6.txt.gz`` from a wheel, the file, or an installed package."""
    if source is None:
        for package in ("open_clip", "clip"):
            spec = importlib.util.find_spec(package)
            if spec is not None and spec.origin is not None:
                candidate = Path(spec.origin).parent / MERGES_FILE_NAME
                if candidate.is_file():
                    source = candidate
                    break
        if source is None:
            raise SystemExit(
                f"no source given and no installed open_clip/clip package holds {MERGES_FILE_NAME}; "
                "run `pip download --no-deps open_clip_torch -d DIR` and pass the wheel"
            )
    if zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            names = [name for name in archive.namelist() if name.endswith("/" + MERGES_FILE_NAME)]
            if not names:
                raise SystemExit(f"{source} holds no {MERGES_FILE_NAME}")
            compressed = archive.read(names[0])
    else:
        compressed = source.read_bytes()
    return gzip.decompress(compressed).decode("utf-8").split("\n")


def derive(lines: list[str]) -> tuple[dict[str, int], list[str]]:
    """``(vocab, merges)`` in Hugging Face's layout from the raw merge-file lines."""
    merges = lines[1 : NUM_MERGES + 1]
    if len(merges) != NUM_MERGES or any(len(merge.split(" ")) != 2 for merge in merges):
        raise SystemExit("the merge file does not look like CLIP's bpe_simple_vocab_16e6")
    symbols = byte_symbols()
    tokens = symbols + [symbol + "</w>" for symbol in symbols]
    tokens += [merge.replace(" ", "") for merge in merges]
    tokens += list(SPECIAL_TOKENS)
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise SystemExit(f"derived {len(vocab)} distinct tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def write_gzip(path: Path, text: str) -> None:
    """Write ``text`` gzipped with a fixed header, so that reruns give identical bytes."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as stream:
        stream.write(text.encode("utf-8"))
    path.write_bytes(buffer.getvalue())


def verify(output: Path) -> None:
    """Build the tokenizer the way ddsedit does and check it against known ids."""
    from transformers import CLIPTokenizer

    from ddsedit.checkpoints import load_bpe

    vocab, merges = load_bpe(output)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges)
    if len(tokenizer) != VOCAB_SIZE:
        raise SystemExit(f"the tokenizer has {len(tokenizer)} tokens, expected {VOCAB_SIZE}")
    for text, ids in KNOWN_IDS.items():
        got = tokenizer(text).input_ids
        if got != ids:
            raise SystemExit(f"{text!r} encodes to {got}, expected {ids}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", nargs="?", type=Path, help=f"open_clip_torch wheel or {MERGES_FILE_NAME}")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="folder to write into")
    parser.add_argument("--no-verify", action="store_true", help="skip the check with transformers")
    args = parser.parse_args(argv)

    vocab, merges = derive(read_merge_lines(args.source))
    args.output.mkdir(parents=True, exist_ok=True)
    write_gzip(args.output / "vocab.json.gz", json.dumps(vocab, ensure_ascii=False, separators=(",", ":")))
    write_gzip(args.output / "merges.txt.gz", "#version: 0.2\n" + "\n".join(merges) + "\n")
    if not args.no_verify:
        verify(args.output)
    for name in ("vocab.json.gz", "merges.txt.gz"):
        print(f"wrote {args.output / name} ({(args.output / name).stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
