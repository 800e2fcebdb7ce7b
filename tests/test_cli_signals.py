"""Stopping the console script: Ctrl-C during an edit and SIGTERM to ``ddsedit ui`` end it cleanly (an exit code, no
traceback, nothing half-written or left behind), run as a user runs them, in their own processes."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "red-circle-on-white.png"


def _until(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _environment(tmp_path: Path) -> dict[str, str]:
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(temporary)}


def test_ctrl_c_during_an_edit_exits_130_in_one_line_and_writes_nothing(tmp_path: Path) -> None:
    output = tmp_path / "out.png"
    # stderr on a terminal, so that the edit shows its progress bar: the sign that the edit is under way
    terminal, terminal_side = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "ddsedit", "dds", "--src", str(EXAMPLE), "--model", "shapes", "--steps", "100000",
         "--ref", "a red circle on a white background", "--query", "a blue circle on a white background",
         "-o", str(output)],
        stdout=subprocess.PIPE, stderr=terminal_side, text=True, env=_environment(tmp_path),
        # as from a terminal: a shell's background job (CI's, maybe) starts its children with SIGINT ignored
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    os.close(terminal_side)
    shown = bytearray()

    def editing() -> bool:
        assert process.poll() is None
        if select.select([terminal], [], [], 0)[0]:
            shown.extend(os.read(terminal, 65536))
        return b"/100000" in shown

    try:
        _until(editing, 120)
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:  # a failed test leaves no edit of 100,000 steps running
            process.kill()
    time.sleep(0.5)
    while select.select([terminal], [], [], 0.2)[0]:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # the other side closed
            break
        if not chunk:
            break
        shown.extend(chunk)
    os.close(terminal)
    text = shown.decode(errors="replace")
    assert process.returncode == 130, text[-2000:]
    assert "Traceback" not in text
    assert not output.exists()


def test_sigterm_stops_the_page_with_exit_0_and_removes_its_folder(tmp_path: Path) -> None:
    from conftest import _free_port

    environment = _environment(tmp_path)
    port = _free_port()
    process = subprocess.Popen([sys.executable, "-m", "ddsedit", "ui", "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)  # fmt: skip

    def answers() -> bool:
        assert process.poll() is None, process.communicate()[1]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    try:
        _until(answers, 120)
        folders = list(Path(environment["TMPDIR"]).glob("ddsedit-ui-*"))
        assert len(folders) == 1  # the page's working folder, while it serves
        process.send_signal(signal.SIGTERM)
        _, errors = process.communicate(timeout=60)
    finally:
        if process.poll() is None:  # a failed test leaves no server running
            process.kill()
    assert process.returncode == 0, errors
    assert "Traceback" not in errors
    assert not folders[0].exists()
