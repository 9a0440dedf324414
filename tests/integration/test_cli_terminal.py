"""The progress bars of `registry upload` and `registry download` in a real terminal (tmux)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from conftest import Registry
from test_cli import BIG, REGISTRY, Cli, new_model


@pytest.fixture
def cli(api_base_url: str, tmp_path: Path) -> Cli:
    return Cli(api_base_url, tmp_path / "home")


class Tmux:
    """A tmux server of the test's own (its own socket), one window of 150x30."""

    def __init__(self) -> None:
        self.socket = f"registry-test-{uuid.uuid4().hex[:8]}"

    def tmux(self, *args: str) -> str:
        return subprocess.run(
            ["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout

    def start(self, script: Path) -> None:
        self.tmux("new-session", "-d", "-x", "150", "-y", "30", f"bash {shlex.quote(str(script))}")

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J")

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)


def run_in_terminal(cli: Cli, tmp_path: Path, args: list[str], key: str, name: str) -> tuple[list[str], str]:
    """Run `registry args` in tmux; the screens seen while it ran, and the last one (with its exit code)."""
    env = cli.env(key)
    env.pop("COLUMNS", None)  # the terminal's own width
    script = tmp_path / f"{name}.sh"
    exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items())
    script.write_text(f"{exports}\n{shlex.quote(REGISTRY)} {shlex.join(args)}\necho EXIT=$?\nsleep 600\n")
    term = Tmux()
    screens: list[str] = []
    try:
        term.start(script)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            screen = term.screen()
            screens.append(screen)
            if "EXIT=" in screen:
                return screens, screen
            time.sleep(0.2)
        raise AssertionError(f"the command did not finish; last screen:\n{screens[-1] if screens else ''}")
    finally:
        term.close()


def percents(screen: str, label: str) -> list[int]:
    return [int(m) for m in re.findall(rf"{re.escape(label)}.*?(\d+)%", screen)]


def test_progress_bars_render_and_finish(cli: Cli, registry: Registry, tmp_path: Path) -> None:
    dev = registry.register("Dev")
    repo_id = new_model(registry, dev)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(os.urandom(BIG))
    (folder / "config.json").write_text("{}")

    # Slowed to 4 MiB/s so that the bars are seen moving, not only finished.
    args = ["upload", repo_id, str(folder), "-v", "v1", "--limit-rate", "4M", "--parallel", "1"]
    screens, last = run_in_terminal(cli, tmp_path, args, dev.api_key, "upload")
    assert "EXIT=0" in last, last
    moving = [p for s in screens for p in percents(s, "weights.bin") if 0 < p < 100]
    assert moving, "no screen showed weights.bin part-way:\n" + "\n---\n".join(screens[-3:])
    assert "━" in "".join(screens)  # the bar itself
    assert percents(last, "weights.bin")[-1] == 100 and percents(last, "2 file(s)")[-1] == 100, last
    assert "12.0/12.0 MiB" in last and "weights.bin: available" in last, last

    plat = registry.create_user("platform")
    registry.grant(plat, repo_id)
    args = ["download", repo_id, "--local-dir", str(tmp_path / "dl"), "--limit-rate", "4M"]
    screens, last = run_in_terminal(cli, tmp_path, args, plat.api_key, "download")
    assert "EXIT=0" in last, last
    assert [p for s in screens for p in percents(s, "weights.bin") if 0 < p < 100], screens[-1]
    assert percents(last, "weights.bin")[-1] == 100 and "verified" in last, last
    assert (tmp_path / "dl" / "weights.bin").read_bytes() == (folder / "weights.bin").read_bytes()
