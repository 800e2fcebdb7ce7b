"""Batch manifests (ddsedit.manifest): reading JSONL and CSV, and reporting every bad row with its line."""

from __future__ import annotations

from pathlib import Path

import pytest
from batch_support import run_cli, write_csv, write_jsonl

from ddsedit.errors import InputError
from ddsedit.manifest import load_manifest


def test_jsonl_and_csv_manifests_read_the_same_rows(tmp_path: Path, images: Path) -> None:
    csv_path = write_csv(
        tmp_path / "manifest.csv",
        "src,ref,query,method,mask,seed,steps,guidance,lr,out",
        "images/red.png,a red circle,a blue circle,,,,,,,",
        "",  # blank lines are skipped
        'images/green.png,,"a blue\ncircle",sds,,3,5,6.5,0.2,green-out.png',  # a quoted cell over two lines
        f"{images / 'blue.png'},a blue circle,a red circle,masked-dds,images/mask.png,,,,,",
    )
    jsonl_path = write_jsonl(
        tmp_path / "manifest.jsonl",
        [
            {"src": "images/red.png", "ref": "a red circle", "query": "a blue circle"},
            {"src": "images/green.png", "query": "a blue\ncircle", "method": "sds", "seed": 3, "steps": "5",
             "guidance": 6.5, "lr": 0.2, "out": "green-out.png", "mask": None},
            {"src": str(images / "blue.png"), "ref": "a blue circle", "query": "a red circle",
             "method": "masked-dds", "mask": "images/mask.png"},
        ],
    )  # fmt: skip
    from_csv, from_jsonl = load_manifest(csv_path), load_manifest(jsonl_path)
    assert from_csv.errors == [] and from_jsonl.errors == []
    assert [row.line for row in from_csv.rows] == [2, 4, 6]  # where each row starts
    assert [row.line for row in from_jsonl.rows] == [1, 2, 3]
    for row_csv, row_jsonl in zip(from_csv.rows, from_jsonl.rows, strict=True):
        assert {**vars(row_csv), "line": 0} == {**vars(row_jsonl), "line": 0}

    red, green, blue = from_csv.rows
    assert red.src == tmp_path / "images/red.png" and red.method == "dds" and red.out == "red.dds.png"
    assert (red.seed, red.steps, red.guidance, red.lr, red.mask) == (None, None, None, None, None)
    assert red.image_size == (60, 40)
    assert (green.method, green.seed, green.steps, green.guidance, green.lr) == ("sds", 3, 5, 6.5, 0.2)
    assert green.out == "green-out.png" and green.query == "a blue\ncircle"
    assert blue.src == images / "blue.png" and blue.mask == tmp_path / "images/mask.png"
    assert blue.out == "blue.masked-dds.png"
    assert red.derived_seed() == load_manifest(csv_path).rows[0].derived_seed()  # stable across reads
    assert red.derived_seed() != blue.derived_seed()


def test_every_bad_row_is_reported_with_its_line_before_any_model_loads(tmp_path: Path, images: Path) -> None:
    manifest = write_csv(
        tmp_path / "manifest.csv",
        "src,ref,query,method,mask,seed,steps,guidance,lr,out",
        "images/red.png,a red circle,a blue circle,,,,,,,",  # line 2: fine
        "images/missing.png,a red circle,a blue circle,,,,,,,",  # 3: missing file
        "images/red.png,a red circle,a blue circle,blend,,,,,,x.png",  # 4: unknown method
        "images/green.png,a green circle,   ,,,,,,,",  # 5: empty prompt
        "images/blue.png,a blue circle,a red circle,,,-1,2.5,abc,0,y.png",  # 6: bad numbers
        "images/yellow.png,a yellow circle,a red circle,,,,,,,red.dds.png",  # 7: duplicate output name
        "images/blue.png,,a red circle,dds,,,,,,z.png",  # 8: dds without ref
        "images/blue.png,a blue circle,a red circle,masked-dds,,,,,,w.png",  # 9: masked-dds without mask
    )
    out_dir = tmp_path / "out"
    # The model does not exist: the run must stop at the manifest, before trying to load it.
    result = run_cli(manifest, out_dir, tmp_path / "no-such-model")
    assert result.exit_code == 2, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    expected = {
        3: "src not found",
        4: "unknown method 'blend'",
        5: "query must not be empty",
        6: "seed must be in the range [0, ",
        7: "duplicate output name 'red.dds.png' (also line 2)",
        8: "ref must not be empty",
        9: "masked-dds needs a mask",
    }
    for line, reason in expected.items():
        assert any(text.startswith(f"{manifest}:{line}: ") and reason in text for text in lines), (line, lines)
    for reason in ("steps must be an integer, got '2.5'", "guidance must be a number, got 'abc'",
                   "lr must be in the range (0, 1000], got 0"):  # fmt: skip
        assert f"{manifest}:6: {reason}" in lines
    assert not any(text.startswith(f"{manifest}:2:") for text in lines)
    assert lines[-1].startswith("error: 7 bad row(s)") and "--skip-invalid" in lines[-1]
    assert not out_dir.exists()  # nothing ran, nothing was written


def test_jsonl_format_errors_carry_line_numbers(tmp_path: Path, images: Path) -> None:
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        '{"src": "images/red.png", "ref": "a red circle", "query": "a blue circle"}\n'
        "{not json\n"
        '["a list"]\n'
        "\n"
        '{"src": "images/red.png", "query": "q", "colour": "red"}\n'
        '{"src": "images/red.png", "ref": "r", "query": 5, "seed": true, "out": "a/b.png"}\n'
    )
    loaded = load_manifest(manifest)
    assert [row.line for row in loaded.rows] == [1]
    reasons = {error.line: [] for error in loaded.errors}
    for error in loaded.errors:
        reasons[error.line].append(error.reason)
    assert reasons[2][0].startswith("invalid JSON") and reasons[3] == ["expected a JSON object, got list"]
    assert "unknown column(s) colour" in reasons[5][0]
    assert sorted(reasons[6]) == sorted(
        ["query must be text, got 5", "query must not be empty", "seed must be an integer, got True",
         "out must be a file name, not a path: 'a/b.png'"]
    )  # fmt: skip
    sources = {error.line: error.src for error in loaded.errors}  # src as written, when the line is a row
    assert sources == {2: "", 3: "", 5: "images/red.png", 6: "images/red.png"}
    with pytest.raises(InputError, match="must be a .jsonl or .csv"):
        load_manifest(tmp_path / "manifest.txt")


def test_outputs_may_be_png_jpeg_or_webp_and_nothing_else(tmp_path: Path, images: Path) -> None:
    names = ["a.png", "b.jpg", "c.JPEG", "d.webp", "e.gif", "f.tiff", "g"]
    manifest = write_jsonl(
        tmp_path / "manifest.jsonl", [{"src": "images/red.png", "query": "q", "method": "sds", "out": name}
                                      for name in names]
    )  # fmt: skip
    loaded = load_manifest(manifest)
    assert [row.out for row in loaded.rows] == names[:4]
    assert [(error.line, error.reason) for error in loaded.errors] == [
        (line, f"out must end in .png, .jpg, .jpeg or .webp (the format it is written in): {name!r}")
        for line, name in ((5, "e.gif"), (6, "f.tiff"), (7, "g"))
    ]


def test_csv_header_problems_are_reported_on_line_1(tmp_path: Path) -> None:
    manifest = write_csv(tmp_path / "m.csv", "source,ref,ref", "a.png,b,c")
    errors = load_manifest(manifest).errors
    assert len(errors) == 1 and errors[0].line == 1
    assert "unknown column(s) source" in errors[0].reason and "repeated column(s) ref" in errors[0].reason
    assert "missing column(s) src, query" in errors[0].reason
