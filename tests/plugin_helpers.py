"""A plugin distribution made on the fly: a `.dist-info` folder with `entry_points.txt`, which
`importlib.metadata` finds on sys.path exactly as it finds a `pip install`ed package, without a network
or a build."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_SRC = REPO / "examples" / "plugin-defense" / "src"


def write_distribution(folder: Path, name: str, version: str, entry_points: dict[str, dict[str, str]]) -> Path:
    """Write `name`'s metadata and entry points ({group: {entry name: "module:object"}}) under `folder`."""
    info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for group, entries in entry_points.items():
        lines.append(f"[{group}]")
        lines.extend(f"{key} = {value}" for key, value in entries.items())
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    return folder


def shrinkpad_distribution(folder: Path) -> Path:
    """The example plugin as `pip install -e examples/plugin-defense` would register it."""
    return write_distribution(folder, "bdbench-shrinkpad", "0.1.0",
                              {"bdbench.defenses": {"shrinkpad": "bdbench_shrinkpad:ShrinkPad"}})


def python_env(*paths: Path) -> dict[str, str]:
    """This environment with `paths` and bdbench's own source first on PYTHONPATH (a fresh process then
    reads the entry points of the distributions found there)."""
    env = dict(os.environ)
    parts = [str(p) for p in paths] + [str(REPO / "src")]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env


def run_bdbench(args: list[str], *paths: Path, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bdbench", *args], env=python_env(*paths), cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
