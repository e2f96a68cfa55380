"""Benchmarks 3 and 4: the `demo` grid under `--executor process` or `--executor ray` with N
workers against `--executor local`, each into a fresh output folder, through the command line
(so both pay for starting Python; ray also pays for starting its local cluster). Prints both wall
times and the ratio.

    python benchmarks/executors_vs_local.py --executor process [--workers 2] [--set training.epochs=2 ...]
    python benchmarks/executors_vs_local.py --executor ray [--workers 2] [--set ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed_run(out: Path, overrides: list[str], *options: str) -> float:
    sets = [x for item in overrides for x in ("--set", item)]
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bdbench", "run", "demo", "--out", str(out), *sets, *options],
                   check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--executor", choices=["process", "ray"], required=True)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        local_s = timed_run(Path(tmp) / "local", args.overrides, "--executor", "local")
        other_s = timed_run(Path(tmp) / args.executor, args.overrides, "--executor", args.executor,
                            "--workers", str(args.workers))
    print(f"demo grid {' '.join(args.overrides) or '(as shipped)'}")
    print(f"  --executor local:                          {local_s:7.1f} s")
    print(f"  --executor {args.executor} --workers {args.workers}:{' ' * (21 - len(args.executor))}{other_s:7.1f} s")
    print(f"  ratio local / {args.executor}: {local_s / other_s:.2f}x")


if __name__ == "__main__":
    main()
