"""The docs run as written: every ```sh and ```python block in README.md and docs/*.md runs
against the demo, as a reader would run it (the broker's default ports and runtime
directory), unless the line before it says why it cannot run here::

    <!-- not run: it starts a Kubernetes deployment -->

A shell block runs under ``bash -e`` from the project root with the venv first on PATH;
``curl`` there fails on an HTTP error, and a comment line that shows JSON (``# {"predictions":
…}``) is an output the block must print. A Python block runs as a script and must exit 0.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import ROOT, BrokerProcess, stop_and_check

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- not run: (?P<reason>[^>]*?) -->\n)?^```(?P<lang>sh|python)\n(?P<code>.*?)^```",
                   re.S | re.M)
OUTPUT = re.compile(r"^# (?P<json>[{\[].*)$", re.M)
CURL = 'curl() { command curl --silent --show-error --fail-with-body "$@"; echo; }\n'


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    lang: str
    code: str
    reason: str | None

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start("code"))
            found.append(Block(path, line, match["lang"], match["code"], match["reason"]))
    return found


RUNNABLE = [block for block in blocks() if block.reason is None]


def test_every_block_that_does_not_run_says_why() -> None:
    shown = blocks()
    assert len(shown) >= 10, "the collector finds the docs' blocks"
    assert all(block.reason is None or len(block.reason.strip()) > 10 for block in shown)
    assert len(RUNNABLE) >= 5


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def demo(demo_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrokerProcess]:
    """``python -m broker`` as the README starts it: ports 8501 and 8500, the default runtime directory."""
    if not (port_free(8501) and port_free(8500)):
        pytest.skip("ports 8501 and 8500 are taken on this host (another broker or TF Serving?): the docs use them")
    broker = BrokerProcess(tmp_path_factory.mktemp("docs"), [f"--demo_models_dir={demo_models}"], frontends=1,
                           default_ports=True)
    try:
        broker.wait_available(["half_plus_two", "mlp", "text"], timeout_s=180)
        yield broker
    finally:
        stop_and_check(broker)


@pytest.mark.parametrize("block", RUNNABLE, ids=[block.name for block in RUNNABLE])
def test_the_block_runs_as_written(block: Block, demo: BrokerProcess) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("TFBROKER_ADDRESS", None)
    if block.lang == "sh":
        argv = ["bash", "-e", "-o", "pipefail", "-c", CURL + block.code]
    else:
        argv = [sys.executable, "-c", block.code]
    result = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, timeout=180)
    out = result.stdout.decode(errors="replace")
    assert result.returncode == 0, f"{block.name} failed:\n{out}\n{result.stderr.decode(errors='replace')[-3000:]}"
    squeezed = re.sub(r"\s+", "", out)
    for expected in OUTPUT.finditer(block.code):
        assert re.sub(r"\s+", "", expected["json"]) in squeezed, f"{block.name} printed {out!r}"
