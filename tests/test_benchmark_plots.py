"""The benchmarks page's plots are drawn from the benchmark's own JSON, and redrawing gives the committed files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "plots.py"
RESULTS = ROOT / "benchmarks" / "results.json"
IMAGES = ROOT / "docs" / "img"


def draw(results: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--json", str(results), "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_the_committed_plots_are_those_of_the_committed_json(tmp_path: Path) -> None:
    """Redrawing from benchmarks/results.json gives the SVG files the docs show, byte for byte."""
    done = draw(RESULTS, tmp_path)
    assert done.returncode == 0, done.stderr
    drawn = sorted(p.name for p in tmp_path.glob("*.svg"))
    assert drawn == ["benchmark-append.svg", "benchmark-ratios.svg", "benchmark-server-time.svg"]
    for name in drawn:
        assert (tmp_path / name).read_text() == (IMAGES / name).read_text(), name
        assert f"img/{name}" in (ROOT / "docs" / "benchmarks.md").read_text()
    assert draw(RESULTS, IMAGES, "--check").returncode == 0


def test_the_plots_show_the_figures_of_the_json(tmp_path: Path) -> None:
    """Each append ratio and server time of each server is drawn; other figures give other plots, seen by --check."""
    results = json.loads(RESULTS.read_text())
    append = tmp_path / "benchmark-append.svg"
    assert draw(RESULTS, tmp_path).returncode == 0
    svg = append.read_text()
    server_time = (tmp_path / "benchmark-server-time.svg").read_text()
    for server, rows in results.items():
        assert server.split(" (")[0] in svg
        for what, value, target in rows:
            if what.startswith("mem.messages.append(m) at "):
                assert f">{value:.2f}x<" in svg, (server, what)
            if target.endswith(" us"):
                assert f">{value:.1f}<" in server_time, (server, what)
    first = next(iter(results))
    results[first][0][1] = 7.25  # the append at 100 messages, made slower
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(results))
    stale = draw(changed, tmp_path, "--check")
    assert stale.returncode == 1 and "benchmark-append.svg" in stale.stderr
    assert draw(changed, tmp_path).returncode == 0
    assert ">7.25x<" in append.read_text() and append.read_text() != svg
