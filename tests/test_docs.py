"""The documentation site: every code block on it runs, and its pages take the README's text, not a copy."""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
_spec = importlib.util.spec_from_file_location("docs_readme_hook", DOCS / "hooks" / "readme.py")
assert _spec is not None and _spec.loader is not None
hook = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hook)

PAGES = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md") if "hooks" not in p.parts)
README = (ROOT / "README.md").read_text()
#: Fenced blocks and the languages a page may use: run (python, console), checked (bash), or not code (text).
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", flags=re.S | re.M)
LANGUAGES = {"python", "console", "bash", "text"}


def blocks(markdown: str) -> list[tuple[str, str]]:
    return [(m[1], m[2]) for m in FENCE.finditer(markdown)]


README_BLOCKS = blocks(README)


def page(name: str) -> str:
    """A page as the site shows it: its readme and include marks expanded."""
    return str(hook.expand((DOCS / name).read_text()))


def test_every_page_is_in_the_nav() -> None:
    """mkdocs.yml's nav lists every page, and each nav entry exists."""
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    listed: list[str] = []

    def walk(items: list[object]) -> None:
        for item in items:
            if isinstance(item, dict):
                for value in item.values():
                    walk(value) if isinstance(value, list) else listed.append(str(value))
            else:
                listed.append(str(item))

    walk(config["nav"])
    assert sorted(listed) == PAGES


def test_pages_include_the_readme_rather_than_copy_it() -> None:
    """No page repeats a README paragraph in its own source: it includes the README's section instead."""
    paragraphs = [p.strip() for p in README.split("\n\n") if len(p.strip()) > 120 and not p.startswith("|")]
    for name in PAGES:
        source = (DOCS / name).read_text()
        for paragraph in paragraphs:
            assert paragraph not in source, (name, paragraph[:80])


def test_each_mark_names_a_readme_section() -> None:
    """Every readme mark on a page names a heading of the README, and each section is included once at most."""
    named = [m[2] for name in PAGES for m in hook._MARK.finditer((DOCS / name).read_text()) if m[1] == "readme"]
    assert len(named) == len(set(named))
    for heading in named:
        assert hook.section(heading).strip(), heading
    with pytest.raises(KeyError):
        hook.section("no such heading")


def _expected(line: str) -> re.Pattern[str]:
    """A shown output line as a pattern: "..." stands for any text."""
    return re.compile(".*".join(re.escape(part) for part in line.split("...")))


def run_console(body: str, env: dict[str, str], cwd: Path) -> None:
    """Run each ``$`` command with bash; its output (stdout and stderr) must be the lines shown under it."""
    steps: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            steps.append((line[2:], []))
        else:
            assert steps, f"output before any command: {line!r}"
            steps[-1][1].append(line)
    background: list[subprocess.Popen[str]] = []
    try:
        for command, shown in steps:
            if command.endswith("&"):
                assert not shown, command
                background.append(subprocess.Popen(["bash", "-c", command[:-1]], env=env, cwd=cwd, text=True))
                continue
            done = subprocess.run(["bash", "-c", command], env=env, cwd=cwd, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=120)  # fmt: skip
            assert done.returncode == 0, (command, done.stdout)
            got = done.stdout.splitlines()
            assert len(got) == len(shown), (command, got, shown)
            for real, expected in zip(got, shown, strict=True):
                assert _expected(expected).fullmatch(real), (command, real, expected)
        for process in background:
            assert process.wait(60) == 0
    finally:
        for process in background:
            if process.poll() is None:
                process.kill()
                process.wait()


def check_bash(body: str, tmp_path: Path) -> None:
    """A bash block: README's commands (their own tests), or the benchmark scripts, checked without a long run."""
    readme_commands = {line.strip() for lang, b in README_BLOCKS if lang == "bash" for line in b.splitlines()}
    for line in body.splitlines():
        words = shlex.split(line, comments=True)
        if not words or line.strip() in readme_commands:
            continue
        assert words[:2] in (["python", "benchmarks/run.py"], ["python", "benchmarks/plots.py"]), line
        script = ROOT / words[1]
        if words[1] == "benchmarks/run.py" or "--check" not in words:
            # Measuring takes minutes and writing would change the checkout: the
            # arguments are parsed (a bad one exits 2), the command itself runs below.
            args = [*words[2:], "--help"] if words[1] == "benchmarks/run.py" else [*words[2:], "--out", str(tmp_path)]
        else:
            args = words[2:]
        done = subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
        assert done.returncode == 0, (line, done.stderr)


@pytest.mark.parametrize("name", PAGES)
def test_every_code_block_of_the_page_runs(name: str, real_url: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Each page's blocks, in order, against a real server: Python runs, console output is what is shown."""
    found = blocks(page(name))
    assert {lang for lang, _ in found} <= LANGUAGES, name
    monkeypatch.setenv("REDIS_URL", real_url)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.chdir(tmp_path)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    namespace: dict[str, object] = {}
    try:
        for n, (lang, body) in enumerate(found):
            if (lang, body) in README_BLOCKS:
                continue  # the README's own example: tests/test_readme.py runs it
            if lang == "python":
                exec(compile(body, f"docs/{name} block {n + 1}", "exec"), namespace)
            elif lang == "console":
                run_console(body, env, tmp_path)
            elif lang == "bash":
                check_bash(body, tmp_path)
    finally:
        subprocess.run([sys.executable, "-m", "redis_memory", "embedded", "stop", str(tmp_path / "db")], env=env,
                       capture_output=True, timeout=60)  # fmt: skip
