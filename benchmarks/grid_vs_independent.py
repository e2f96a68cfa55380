"""Benchmark 2: the `demo` grid run by bdbench against its experiments run one by one as
independent processes without the cache (each process trains its own victim, the way a
one-script-per-method toolkit runs a table of results). Prints both wall times and the ratio.

    python benchmarks/grid_vs_independent.py [--set training.epochs=2 ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bdbench.grid import ExperimentSpec, expand, load_grid


def run_one(spec_file: str) -> None:
    """Child mode: one experiment with an empty cache of its own."""
    from bdbench.experiment import run_experiment
    from bdbench.store import ArtifactCache

    spec = ExperimentSpec.model_validate_json(Path(spec_file).read_text())
    with tempfile.TemporaryDirectory() as cache:
        row = run_experiment(spec, ArtifactCache(cache))
    print(json.dumps({"status": row["status"], "clean_acc": row.get("clean_acc"), "asr": row.get("asr")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        return run_one(args.one)
    specs = expand(load_grid("demo", args.overrides))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        sets = [x for item in args.overrides for x in ("--set", item)]
        subprocess.run([sys.executable, "-m", "bdbench", "run", "demo", "--out", str(tmp / "grid"), *sets],
                       check=True, capture_output=True)
        grid_s = time.perf_counter() - start

        start = time.perf_counter()
        for i, spec in enumerate(specs):
            spec_file = tmp / f"spec{i}.json"
            spec_file.write_text(spec.model_dump_json())
            done = subprocess.run([sys.executable, __file__, "--one", str(spec_file)], check=True,
                                  capture_output=True, text=True)
            assert json.loads(done.stdout.splitlines()[-1])["status"] == "ok", done.stdout
        independent_s = time.perf_counter() - start
    victims = len({s.victim_key for s in specs})
    print(f"demo grid {' '.join(args.overrides) or '(as shipped)'}: {len(specs)} experiments, {victims} victims")
    print(f"  bdbench run (victims cached and shared):        {grid_s:7.1f} s")
    print(f"  one process per experiment, no cache ({len(specs)} victims): {independent_s:7.1f} s")
    print(f"  ratio independent / bdbench: {independent_s / grid_s:.2f}x")


if __name__ == "__main__":
    main()
