"""The README is the truth: its examples run, its commands are what CI runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_readme_python_examples_run(index: int, real_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each Python example in the README runs as written, against a real server from REDIS_URL."""
    monkeypatch.setenv("REDIS_URL", real_url)
    exec(compile(blocks("python")[index], f"README.md example {index + 1}", "exec"), {})


def test_readme_has_the_two_commands_and_ci_runs_the_test_one() -> None:
    """The README gives an install-and-demo command and a test command; .ci/run runs the latter."""
    commands = [b.strip() for b in blocks("bash")]
    assert commands[0] == "pip install -e '.[embedded]' && python examples/demo.py"
    assert commands[1] == "pip install -e '.[test]' && python -m pytest"
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_demo_runs_on_the_embedded_server(tmp_path: Path) -> None:
    """The README's demo, with no REDIS_URL, starts the embedded server and loses nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REDIS_")}
    env["XDG_DATA_HOME"] = str(tmp_path)
    try:
        done = subprocess.run([sys.executable, str(ROOT / "examples" / "demo.py")], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "none lost or duplicated: True; each agent's order kept: True" in done.stdout
        assert "stop it with: redis-memory embedded stop" in done.stdout  # it says the server stays
        assert (tmp_path / "redis_memory" / "embedded" / "valkey.sock").exists()
    finally:
        from redis_memory import stop_embedded

        stop_embedded(tmp_path / "redis_memory" / "embedded")
