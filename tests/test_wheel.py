"""The package as it would be published: the sdist and the wheel build, and the wheel works in a fresh venv."""

from __future__ import annotations

import email
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import redis

import redis_memory

ROOT = Path(__file__).resolve().parent.parent


def sh(*command: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
       timeout: float = 600) -> subprocess.CompletedProcess[str]:  # fmt: skip
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip
    assert done.returncode == 0, (command, done.stdout[-3000:], done.stderr[-3000:])
    return done


def test_wheel_and_sdist_build_install_and_run_the_demo(tmp_path: Path, servers: dict[str, Any]) -> None:
    """Build both from the files git keeps, install the wheel into a new venv, run the demo and the CLI there."""
    source = tmp_path / "src"
    tracked = sh("git", "ls-files", "--cached", "--others", "--exclude-standard", cwd=ROOT).stdout.splitlines()
    for name in tracked:
        if (ROOT / name).is_file():  # a file deleted but not yet committed is not there
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    dist = tmp_path / "dist"
    sh(sys.executable, "-m", "build", "--sdist", "--wheel", "--outdir", dist, source)
    version = redis_memory.__version__
    wheel = dist / f"redis_memory-{version}-py3-none-any.whl"
    sdist = dist / f"redis_memory-{version}.tar.gz"
    assert wheel.exists() and sdist.exists(), sorted(p.name for p in dist.iterdir())

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = email.message_from_string(archive.read(f"redis_memory-{version}.dist-info/METADATA").decode())
        entry_points = archive.read(f"redis_memory-{version}.dist-info/entry_points.txt").decode()
    assert "redis_memory/py.typed" in names and "redis_memory/__main__.py" in names
    assert "redis_memory/lua/apply.lua" in names  # the server code, package data
    assert f"redis_memory-{version}.dist-info/licenses/LICENSE" in names
    assert not [n for n in names if n.startswith("tests/")]
    assert "redis-memory = redis_memory.cli:main" in entry_points
    assert metadata["Version"] == version and metadata["Requires-Python"] == ">=3.11"
    assert "Programming Language :: Python :: 3.11" in metadata.get_all("Classifier", [])
    description = metadata.get_payload()
    assert "redis-memory" in description
    # Off GitHub, a link relative to the checkout leads nowhere.
    assert re.findall(r"\]\((?!https?://|#)[^)]*\)", str(description)) == []
    with tarfile.open(sdist) as archive:
        members = {Path(m).relative_to(f"redis_memory-{version}").as_posix() for m in archive.getnames()[1:]}
    assert {"LICENSE", "CHANGELOG.md", "README.md", "setup.cfg", "pyproject.toml", "examples/demo.py"} <= members

    venv = tmp_path / "venv"
    sh(sys.executable, "-m", "venv", venv)
    python = venv / "bin" / "python"
    sh(python, "-m", "pip", "install", "-q", wheel)
    away = tmp_path / "elsewhere"  # not the checkout: imports find the installed package only
    away.mkdir()
    shown = sh(python, "-c", "import redis_memory; print(redis_memory.__version__, redis_memory.__file__)", cwd=away)
    found_version, location = shown.stdout.split()
    assert found_version == version and location.startswith(str(venv))

    url = servers["redis7"].url
    redis.Redis.from_url(url).flushall()
    env = {"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "REDIS_URL": url, "HOME": str(tmp_path)}
    shutil.copy(ROOT / "examples" / "demo.py", away / "demo.py")
    demo = sh(python, "demo.py", cwd=away, env=env)
    assert "none lost or duplicated: True; each agent's order kept: True" in demo.stdout
    listed = sh(venv / "bin" / "redis-memory", "ls", "conversation", cwd=away, env=env)
    assert listed.stdout.splitlines()[1].split()[3] == "201" and listed.stdout.rstrip().endswith("demo-trip")
    redis.Redis.from_url(url).flushall()
