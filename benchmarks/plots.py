"""Plots for the benchmarks page, drawn from the JSON that ``run.py --json`` writes.

    python benchmarks/run.py --json benchmarks/results.json   # measure (some minutes)
    python benchmarks/plots.py                                # draw docs/img/*.svg from it
    python benchmarks/plots.py --check                        # exit 1 if the SVGs are not those of the JSON

The SVG is written by hand (no plotting package): the same JSON always gives
the same bytes, which is what ``--check`` and the tests rely on.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from html import escape
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results.json"
OUT = ROOT / "docs" / "img"
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
WIDTH, HEIGHT = 760, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 200, 40, 60

Row = tuple[str, float, str]


def load(path: Path) -> dict[str, list[Row]]:
    """The rows of each server, as ``run.py`` wrote them: (what, value, target)."""
    data = json.loads(path.read_text())
    return {server: [(str(w), float(v), str(t)) for w, v, t in rows] for server, rows in data.items()}


def is_ratio(row: Row) -> bool:
    """A row that is a ratio to raw redis-py (not a time in us, ms or s)."""
    return not row[2].endswith((" us", " ms", " s"))


def append_by_length(rows: list[Row]) -> list[tuple[int, float]]:
    """(list length, append ratio) for the rows ``mem.messages.append(m) at N messages``."""
    found = []
    for what, value, _ in rows:
        match = re.fullmatch(r"mem\.messages\.append\(m\) at ([\d,]+) messages(?: \(.*\))?", what)
        if match:
            found.append((int(match[1].replace(",", "")), value))
    return sorted(found)


def _svg(title: str, body: list[str], width: int = WIDTH, height: int = HEIGHT) -> str:
    head = (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        'font-family="sans-serif" font-size="12">'
    )
    return "\n".join([head, f"<title>{escape(title)}</title>",
                      f'<rect width="{width}" height="{height}" fill="white"/>',
                      f'<text x="{width / 2:.1f}" y="22" text-anchor="middle" font-size="15">{escape(title)}</text>',
                      *body, "</svg>", ""])  # fmt: skip


def _y_axis(top: float, to_y: object, label: str) -> list[str]:
    assert callable(to_y)
    out = []
    step = 0.5 if top <= 4 else 1.0
    tick = 0.0
    while tick <= top + 1e-9:
        y = to_y(tick)
        out.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{tick:.1f}x</text>')
        tick += step
    mid = (TOP + HEIGHT - BOTTOM) / 2
    out.append(f'<text x="18" y="{mid:.1f}" text-anchor="middle" transform="rotate(-90 18 {mid:.1f})">'
               f"{escape(label)}</text>")  # fmt: skip
    return out


def plot_append(results: dict[str, list[Row]]) -> str:
    """Append cost against list length, per server, with raw redis-py (1x) and the target."""
    series = {server: append_by_length(rows) for server, rows in results.items()}
    lengths = sorted({n for points in series.values() for n, _ in points})
    if not lengths:
        raise SystemExit("no append rows in the results")
    top = math.ceil(max([2.5, *(v for points in series.values() for _, v in points)]) * 1.15 * 2) / 2
    low, high = math.log10(lengths[0]), math.log10(lengths[-1])

    def to_x(n: int) -> float:
        span = (high - low) or 1.0
        return LEFT + 30 + (math.log10(n) - low) / span * (WIDTH - LEFT - RIGHT - 60)

    def to_y(v: float) -> float:
        return HEIGHT - BOTTOM - v / top * (HEIGHT - TOP - BOTTOM)

    body = _y_axis(top, to_y, "time / raw redis-py RPUSH")
    for n in lengths:
        x = to_x(n)
        body.append(f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 18}" text-anchor="middle">{n:,}</text>')
    body.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2:.1f}" y="{HEIGHT - 18}" text-anchor="middle">'
                "messages already in the list (log scale)</text>")  # fmt: skip
    legend = LEFT + (WIDTH - LEFT - RIGHT) + 16
    lines = [("raw redis-py RPUSH (1x)", 1.0, "#555", "4 0"), ("target (2.5x)", 2.5, "#999", "6 4")]
    for n, (name, value, color, dash) in enumerate(lines):
        y = to_y(value)
        body.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="{color}" '
                    f'stroke-dasharray="{dash}"/>')  # fmt: skip
        body.append(_legend(legend, TOP + 20 + 22 * n, color, name, dash))
    for n, (server, points) in enumerate(series.items()):
        color = COLORS[n % len(COLORS)]
        path = " ".join(f"{to_x(length):.1f},{to_y(v):.1f}" for length, v in points)
        body.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2.5"/>')
        for length, v in points:
            x, y = to_x(length), to_y(v)
            body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{color}"/>')
            highest = max(v2 for points2 in series.values() for l2, v2 in points2 if l2 == length)
            label_y = y - 9 if v == highest else y + 18  # the highest above, the others below: legible when close
            body.append(f'<text x="{x:.1f}" y="{label_y:.1f}" fill="{color}" text-anchor="middle">{v:.2f}x</text>')
        body.append(_legend(legend, TOP + 20 + 22 * (n + 2), color, _short(server)))
    return _svg("mem.messages.append(m): cost against list length", body)


def _legend(x: float, y: float, color: str, text: str, dash: str = "0") -> str:
    words = escape(text if len(text) <= 24 else text[:23] + "…")
    return (f'<line x1="{x:.1f}" y1="{y:.1f}" x2="{x + 22:.1f}" y2="{y:.1f}" stroke="{color}" stroke-width="2.5" '
            f'stroke-dasharray="{dash}"/><text x="{x + 28:.1f}" y="{y + 4:.1f}">{words}</text>')  # fmt: skip


def _short(what: str) -> str:
    """A row's label (or a server's name) without the figures or notes in parentheses."""
    return re.sub(r"\s+\([^)]*\)", "", what).strip()


def plot_ratios(results: dict[str, list[Row]]) -> str:
    """Every ratio row of every server as a bar, with its target where it has a number."""
    labels: list[str] = []
    for rows in results.values():
        for row in rows:
            if is_ratio(row) and _short(row[0]) not in labels and not row[0].startswith(" "):
                labels.append(_short(row[0]))
    servers = list(results)
    row_height = 14 * len(servers) + 10
    height = TOP + 30 + row_height * len(labels) + 40
    right = 60
    label_width = max(360, 10 + round(6.6 * max(len(label) for label in labels)))  # 12px sans: about 6.6px a letter
    width = label_width + WIDTH - 360
    values = [v for rows in results.values() for row in rows if is_ratio(row) for v in [row[1]]]
    top = math.ceil(max([3.0, *values]) * 1.1)

    def to_x(v: float) -> float:
        return label_width + v / top * (width - label_width - right)

    body = []
    for tick in range(top + 1):
        x = to_x(tick)
        body.append(f'<line x1="{x:.1f}" y1="{TOP + 20}" x2="{x:.1f}" y2="{height - 30}" stroke="#ddd"/>')
        body.append(f'<text x="{x:.1f}" y="{height - 14}" text-anchor="middle">{tick}x</text>')
    for n, server in enumerate(servers):
        x = label_width + 180 * n
        body.append(f'<rect x="{x}" y="{TOP + 2}" width="12" height="12" fill="{COLORS[n % len(COLORS)]}"/>')
        body.append(f'<text x="{x + 18}" y="{TOP + 12}">{escape(_short(server))}</text>')
    for i, label in enumerate(labels):
        y0 = TOP + 30 + row_height * i
        body.append(f'<text x="{label_width - 8}" y="{y0 + row_height / 2 + 2:.1f}" text-anchor="end">'
                    f"{escape(label)}</text>")  # fmt: skip
        for n, server in enumerate(servers):
            found = [row for row in results[server] if is_ratio(row) and _short(row[0]) == label]
            if not found:
                continue
            _, value, target = found[0]
            y = y0 + 5 + 14 * n
            color = COLORS[n % len(COLORS)]
            body.append(f'<rect x="{label_width}" y="{y}" width="{to_x(value) - label_width:.1f}" height="11" '
                        f'fill="{color}"/>')  # fmt: skip
            limit = re.fullmatch(r"<= ([\d.]+)", target)
            text_x = to_x(value)
            if limit:
                tx = to_x(float(limit[1]))
                body.append(f'<line x1="{tx:.1f}" y1="{y - 2}" x2="{tx:.1f}" y2="{y + 13}" stroke="black" '
                            'stroke-width="2"/>')  # fmt: skip
                text_x = max(text_x, tx)
            body.append(f'<text x="{text_x + 4:.1f}" y="{y + 10}" font-size="11">{value:.2f}x</text>')
    body.append(f'<text x="{label_width}" y="{height - 2}" font-size="11">ratio to raw redis-py on the same server; '
                "black ticks: targets</text>")  # fmt: skip
    return _svg("Every ratio row, against its target", body, width, height)


def server_times(rows: list[Row]) -> list[tuple[str, float]]:
    """(what, microseconds) of the server-time rows: the library's calls, then the raw HSET their label quotes."""
    found: list[tuple[str, float]] = []
    hset = None
    for what, value, target in rows:
        if target.endswith(" us"):
            match = re.search(r"\(an HSET: ([\d.]+) us\)", what)
            hset = float(match[1]) if match else hset
            found.append((_short(what).replace("apply function, server time per ", ""), value))
    return [*found, ("raw HSET", hset)] if found and hset is not None else found


def plot_server_time(results: dict[str, list[Row]]) -> str:
    """The server's time per call (INFO commandstats) of the library's writes and of a raw HSET, per server."""
    series = {server: server_times(rows) for server, rows in results.items()}
    labels = [what for what, _ in next(iter(series.values()))]
    top = math.ceil(max([12.0, *(v for points in series.values() for _, v in points)]) * 1.15 / 10) * 10
    group = (WIDTH - LEFT - RIGHT) / max(1, len(labels))
    bar = min(40.0, (group - 20) / max(1, len(series)))

    def to_y(v: float) -> float:
        return HEIGHT - BOTTOM - v / top * (HEIGHT - TOP - BOTTOM)

    body = []
    step = next(step for step in (5, 10, 20, 25, 50, 100, 200, 500) if top / step <= 8)
    for tick in range(0, int(top) + 1, step):
        y = to_y(tick)
        body.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="#ddd"/>')
        body.append(f'<text x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">{tick} µs</text>')
    y = to_y(12.0)
    body.append(f'<line x1="{LEFT}" y1="{y:.1f}" x2="{WIDTH - RIGHT}" y2="{y:.1f}" stroke="#999" '
                'stroke-dasharray="6 4"/>')  # fmt: skip
    legend = WIDTH - RIGHT + 16
    body.append(_legend(legend, TOP + 20, "#999", "target (12 µs)", "6 4"))
    for i, label in enumerate(labels):
        x0 = LEFT + group * i + 10
        body.append(f'<text x="{x0 + (group - 20) / 2:.1f}" y="{HEIGHT - BOTTOM + 18}" text-anchor="middle">'
                    f"{escape(label)}</text>")  # fmt: skip
        for n, points in enumerate(series.values()):
            value = dict(points).get(label)
            if value is None:
                continue
            color = COLORS[n % len(COLORS)]
            x, y = x0 + bar * n, to_y(value)
            body.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar - 2:.1f}" height="{to_y(0) - y:.1f}" '
                        f'fill="{color}"/>')  # fmt: skip
            body.append(f'<text x="{x + bar / 2 - 1:.1f}" y="{y - 5:.1f}" text-anchor="middle" font-size="11">'
                        f"{value:.1f}</text>")  # fmt: skip
    for n, server in enumerate(series):
        body.append(_legend(legend, TOP + 42 + 22 * n, COLORS[n % len(COLORS)], _short(server)))
    return _svg("Server time per call (INFO commandstats)", body)


def plots(results: dict[str, list[Row]]) -> dict[str, str]:
    """File name -> SVG text, for the results of one run (the server-time plot when the run measured it)."""
    drawn = {"benchmark-append.svg": plot_append(results), "benchmark-ratios.svg": plot_ratios(results)}
    if all(server_times(rows) for rows in results.values()):
        drawn["benchmark-server-time.svg"] = plot_server_time(results)
    return drawn


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=RESULTS, help="what run.py --json wrote")
    parser.add_argument("--out", type=Path, default=OUT, help="the folder for the SVG files")
    parser.add_argument("--check", action="store_true", help="compare with the files there instead of writing")
    args = parser.parse_args(argv)
    drawn = plots(load(args.json))
    if args.check:
        stale = [name for name, svg in drawn.items() if not (args.out / name).exists()
                 or (args.out / name).read_text() != svg]  # fmt: skip
        for name in stale:
            print(f"{args.out / name} is not what {args.json} gives: run python benchmarks/plots.py", file=sys.stderr)
        return 1 if stale else 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, svg in drawn.items():
        (args.out / name).write_text(svg)
        print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
