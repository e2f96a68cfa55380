"""Run every effect test across CPU kernel sets, torch thread counts and seeds; print each measured
value beside its bar, with the smallest margin it kept.

    python tools/effect_spread.py [--jobs 2] [--out DIR] [--configs default-1-0,avx2-2-0,...] [-- PYTEST ARGS]

A configuration is KERNELS-THREADS-SEED. KERNELS `default` lets PyTorch and oneDNN pick the CPU's
best instruction set; `avx2` forces the AVX2 kernels (`ATEN_CPU_CAPABILITY=avx2`,
`ONEDNN_MAX_CPU_ISA=AVX2`), what most laptops and many cloud machines run. Each configuration is one
`pytest -m effect` process whose `effect` fixture appends its measurements to a JSON-lines file
(tests/effects.py); the table is built from those files, so a run can be re-tabulated with
`--table-only`. The margin is how far the worst configuration stayed on the passing side of the bar
(negative: it failed there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIGS = "default-1-0,avx2-1-0,default-2-0,avx2-2-0,default-1-1,avx2-1-2"
KERNEL_ENV = {"default": {}, "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def _parse(config: str) -> tuple[str, int, int]:
    kernels, threads, seed = config.split("-")
    if kernels not in KERNEL_ENV:
        raise SystemExit(f"unknown kernel set {kernels!r} in {config!r}; use one of {', '.join(KERNEL_ENV)}")
    return kernels, int(threads), int(seed)


def run_config(config: str, out: Path, pytest_args: list[str]) -> tuple[str, int]:
    kernels, threads, seed = _parse(config)
    log = out / f"{config}.jsonl"
    log.unlink(missing_ok=True)
    env = {**os.environ, **KERNEL_ENV[kernels], "BDBENCH_EFFECT_LOG": str(log),
           "BDBENCH_TEST_THREADS": str(threads), "BDBENCH_TEST_SEED": str(seed),
           "OMP_NUM_THREADS": str(threads)}
    with (out / f"{config}.txt").open("w") as text:
        done = subprocess.run([sys.executable, "-m", "pytest", "-m", "effect", "-q", "-p", "no:cacheprovider",
                               *pytest_args], cwd=ROOT, env=env, stdout=text, stderr=subprocess.STDOUT)
    return config, done.returncode


def margin(value: float, op: str, bar: float) -> float:
    """Signed distance from the bar, positive on the passing side."""
    return value - bar if op in (">", ">=") else bar - value


def table(out: Path, configs: list[str]) -> str:
    values: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    bars: dict[tuple[str, str], tuple[str, float]] = {}
    kernels_seen: dict[str, str] = {}
    for config in configs:
        log = out / f"{config}.jsonl"
        if not log.exists():
            continue
        for line in log.read_text().splitlines():
            record = json.loads(line)
            key = (record["test"].removeprefix("tests/"), record["what"])
            values[key][config] = record["value"]
            bars[key] = (record["op"], record["bar"])
            kernels_seen[config] = record["kernels"]
    header = ["test", "measure", "bar", *[f"{c} ({kernels_seen.get(c, '?')})" for c in configs], "min margin"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in sorted(values):
        op, bar = bars[key]
        measured = values[key]
        worst = min(margin(v, op, bar) for v in measured.values())
        cells = [f"{measured[c]:.3f}" if c in measured else "-" for c in configs]
        lines.append(f"| {key[0]} | {key[1]} | {op} {bar:g} | " + " | ".join(cells) + f" | {worst:+.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS, help="comma-separated KERNELS-THREADS-SEED")
    parser.add_argument("--jobs", type=int, default=1, help="configurations run at once")
    parser.add_argument("--out", type=Path, default=Path("effect-spread"), help="folder for the logs")
    parser.add_argument("--table-only", action="store_true", help="tabulate the logs already in --out")
    args, pytest_args = parser.parse_known_args()
    pytest_args = [a for a in pytest_args if a != "--"]
    configs = args.configs.split(",")
    for config in configs:
        _parse(config)
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        with ThreadPoolExecutor(args.jobs) as pool:
            for config, code in pool.map(lambda c: run_config(c, args.out, pytest_args), configs):
                print(f"{config}: pytest exit {code} (output in {args.out / (config + '.txt')})", file=sys.stderr)
    print(table(args.out, configs))


if __name__ == "__main__":
    main()
