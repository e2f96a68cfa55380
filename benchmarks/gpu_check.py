"""GPU check (issue 26): the trainer, batched Neural Cleanse, vectorised seeds and defense-cost benchmarks on CUDA, in
one run.

One short script for any machine with an NVIDIA GPU, not part of CI. It runs, one after another, each
in its own process with its own time limit so that the whole stays under `--minutes` (default 9.5):

1. `trainer_vs_dataloader.py --device cuda`: bdbench's trainer (bfloat16 autocast, channels-last, batches
   augmented on the device) against a per-sample DataLoader loop, images per second and their ratio;
2. `nc_batched_vs_per_label.py --device cuda`: Neural Cleanse's batched inversion at 2,048 and 128
   images a pass against a loop over labels, and their ratios (batching is meant for GPUs);
3. `vectorised_seeds.py --device cuda`: 3 and 8 seeds of cnn-small and PreAct-ResNet18 (width 0.25)
   trained as one vmapped computation against one seed at a time, model-steps per second and their
   ratio (on the CPU it does not pay; a GPU that one small model leaves idle is where it should);
4. `defense_cost.py` (its experiments pick CUDA by themselves): each defense's cost divided by the
   time to train its victim, on one victim of `model-defenses`, and their median.

At the end it prints every ratio line again, under the step that printed it. It refuses, with one line
and exit status 2, where torch sees no CUDA device. `--dry-run` prints the four commands and exits.

    python benchmarks/gpu_check.py [--minutes 9.5] [--defenses ft,nc,mmbd,anp] [--out DIR] [--dry-run]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# Each step's share of the time limit (trainer, NC, vectorised seeds, cost): the cost benchmark trains a victim
# and runs every asked defense in its own process, so it gets the most.
SHARES = (0.22, 0.13, 0.12, 0.53)


def commands(out: Path, defenses: str | None, threads: int) -> list[tuple[str, list[str]]]:
    """(title, argv) of each step, small settings: every step finishes in a few minutes on a GPU."""
    python = sys.executable
    cost = [python, str(HERE / "defense_cost.py"), "--grid", "model-defenses", "--attack", "badnets", "--seed", "0",
            "--out", str(out / "defense-cost"), "--threads", str(threads), "--json", str(out / "defense-cost.json")]
    if defenses:
        cost += ["--defenses", defenses]
    return [
        ("trainer against a DataLoader loop",
         [python, str(HERE / "trainer_vs_dataloader.py"), "--device", "cuda", "--epochs", "2", "--repeats", "2",
          "--subset", "4000", "--threads", str(threads)]),
        ("Neural Cleanse, batched against per label",
         [python, str(HERE / "nc_batched_vs_per_label.py"), "--device", "cuda", "--epochs", "3", "--budget", "320",
          "--threads", str(threads)]),
        ("seeds vectorised against one at a time",
         [python, str(HERE / "vectorised_seeds.py"), "--device", "cuda", "--steps", "20", "--repeats", "2",
          "--threads", str(threads)]),
        ("defense cost / victim training", cost),
    ]


def _is_ratio(line: str) -> bool:
    return "ratio" in line or line.startswith("cost / victim training") or "victim training" in line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=9.5, help="time limit of the whole check")
    parser.add_argument("--defenses", default=None,
                        help="comma-separated defenses of model-defenses for the cost step (default: all of them)")
    parser.add_argument("--out", default=None, help="output folder (default: a fresh temporary one)")
    parser.add_argument("--threads", type=int, default=4, help="CPU threads of each step's torch")
    parser.add_argument("--dry-run", action="store_true", help="print the commands and exit")
    args = parser.parse_args()
    if args.dry_run:
        for title, argv in commands(Path(args.out or "OUT"), args.defenses, args.threads):
            print(f"# {title}\n{' '.join(argv)}")
        return

    import torch

    if not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device visible to torch {torch.__version__} (CUDA build: "
              f"{torch.version.cuda or 'none'}); run this on a machine with an NVIDIA GPU and a CUDA build of torch, "
              "or run the CPU benchmarks in benchmarks/ directly", file=sys.stderr)
        sys.exit(2)
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="bdbench-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    steps = commands(out, args.defenses, args.threads)
    print(f"GPU check on {torch.cuda.get_device_name(0)} (torch {torch.__version__}, CUDA {torch.version.cuda}), "
          f"output in {out}, at most {args.minutes:g} minutes", flush=True)
    deadline = time.monotonic() + args.minutes * 60
    summary: list[tuple[str, list[str], str]] = []
    for index, (title, argv) in enumerate(steps):
        # A step gets its share of the time left, so what the steps before it did not use goes to the rest.
        left = deadline - time.monotonic()
        limit = max(30.0, left * SHARES[index] / sum(SHARES[index:]))
        print(f"\n=== {title} (limit {limit:.0f} s)\n$ {' '.join(argv)}", flush=True)
        lines: list[str] = []
        start = time.monotonic()
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}) as proc:
            try:
                for line in _lines_until(proc, start + limit):
                    print(line, end="", flush=True)
                    lines.append(line.rstrip())
                status = f"exit {proc.wait()}"
            except TimeoutError:
                proc.kill()
                status = f"stopped at its limit of {limit:.0f} s (the lines above are what it finished)"
        summary.append((title, [line for line in lines if _is_ratio(line.strip())], status))
    print("\n=== ratios")
    for title, ratio_lines, status in summary:
        print(f"{title} ({status}):")
        for line in ratio_lines or ["(none printed)"]:
            print(f"  {line.strip()}")


def _lines_until(proc: subprocess.Popen, deadline: float):
    """The lines `proc` prints, raising TimeoutError once `deadline` (time.monotonic) has passed."""
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            if not selector.select(timeout=min(left, 5.0)):
                continue
            line = proc.stdout.readline()
            if not line:
                return
            yield line


if __name__ == "__main__":
    main()
