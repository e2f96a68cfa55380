"""Ours beside the published figures, cell by cell, with the agreement-in-kind verdict.

Reads the results of `fidelity-cifar10` / `fidelity-gtsrb` / `quant-blindspots` output folders and
prints the markdown tables of `docs/fidelity.md`:

- BackdoorBench (Wu et al., NeurIPS 2022 Datasets and Benchmarks), CIFAR-10, PreAct-ResNet18,
  BadNets at 10%: clean accuracy / ASR (%) per defense, beside ours (the mean over the seeds that
  are stored, with their count). Each cell is the defense's variant as the `fidelity-<data set>`
  grid lists it (for example `anp(iterations=2000)`); other variants stored in the same folders
  (controlled changes) follow the table as rows of their own, never averaged into a cell.
- Quantization Blindspots (arXiv 2512.06243), PreAct-ResNet18, the same BadNets: no defense at FP32
  and at INT4 (ours: `int4-sim-tensor`, the study's scheme), on GTSRB and CIFAR-10.

Agreement in kind: where the published cell removes the backdoor (ASR <= 10%), ours must bring
ASR to <= 20% with clean accuracy within 5 points of our victim's; where it leaves the backdoor
(ASR >= 50%), ours must leave ASR >= 50%. A victim row ("no defense") agrees when the backdoor
takes hold (ASR >= 50%).

    python tools/fidelity_table.py --out OUT [--out OUT2 ...] [--dataset cifar10]
"""

from __future__ import annotations

import argparse

import pandas as pd

from bdbench.defenses import DEFENSES
from bdbench.grid import load_grid
from bdbench.store import load_results

# (clean accuracy, ASR) in %, BackdoorBench's CIFAR-10 PreAct-ResNet18 BadNets 10% table.
BACKDOORBENCH_CIFAR10_BADNETS = {
    "none": (91.32, 95.03), "ft": (89.96, 1.48), "fp": (91.31, 57.13), "nc": (89.05, 1.27),
    "nad": (89.87, 2.14), "anp": (84.17, 0.73), "ibau": (89.16, 1.29), "clp": (90.07, 77.56),
    "ac": (88.80, 86.23), "abl": (83.32, 0.00),
}
# (clean accuracy, ASR) in %, Quantization Blindspots, PreAct-ResNet18, BadNets, no defense.
QUANT_BLINDSPOTS = {
    ("gtsrb32", "fp32"): (96.0, 99.4), ("gtsrb32", "int4-sim-tensor"): (95.6, 99.3),
    ("cifar10", "fp32"): (90.8, 99.8), ("cifar10", "int4-sim-tensor"): (52.7, 91.0),
}


def agreement(published_asr: float, victim_acc: float, acc: float, asr: float, is_victim: bool) -> str:
    """'agrees', 'DISAGREES' or 'n/a' (published ASR between 10% and 50%), all in %."""
    if is_victim or published_asr >= 50:
        return "agrees" if asr >= 50 else "DISAGREES"
    if published_asr <= 10:
        return "agrees" if asr <= 20 and victim_acc - acc <= 5 else "DISAGREES"
    return "n/a"


def ours(rows: pd.DataFrame) -> tuple[float, float, float, int]:
    """Mean clean accuracy, ASR and victim clean accuracy (%) of `rows`, and their count."""
    return (100 * rows.clean_acc.mean(), 100 * rows.asr.mean(), 100 * rows.clean_acc_before.mean(), len(rows))


def grid_variants(dataset: str) -> dict[str, str]:
    """Each defense's variant as the `fidelity-<dataset>` grid lists it: {"anp": "anp(iterations=2000)", ...}."""
    grid = load_grid(f"fidelity-{dataset.removesuffix('32')}")
    return {d.name: DEFENSES.variant(d.name, d.params, d.label) for d in grid.defenses}


def backdoorbench_table(results: pd.DataFrame, dataset: str) -> list[str]:
    rows = results[(results.dataset.str.split("(").str[0] == dataset) & (results.attack == "badnets") & (results.precision == "fp32")
                   & (results.status == "ok")]
    variants = grid_variants(dataset)
    lines = ["| defense | published CA / ASR | ours CA / ASR | our victim's CA | seeds | in kind |",
             "|---|---:|---:|---:|---:|---|"]
    agree = total = 0
    for defense, (pub_acc, pub_asr) in BACKDOORBENCH_CIFAR10_BADNETS.items():
        mine = rows[rows.defense_variant == variants[defense]]
        if mine.empty:
            lines.append(f"| {defense} | {pub_acc:.2f} / {pub_asr:.2f} | not run | | 0 | |")
            continue
        acc, asr, victim_acc, count = ours(mine)
        verdict = agreement(pub_asr, victim_acc, acc, asr, defense == "none")
        agree, total = agree + (verdict == "agrees"), total + (verdict != "n/a")
        lines.append(f"| {defense} | {pub_acc:.2f} / {pub_asr:.2f} | {acc:.2f} / {asr:.2f} | {victim_acc:.2f} | "
                     f"{count} | {verdict} |")
    lines.append(f"\n{agree} of {total} cells run agree in kind.")
    controls = rows[rows.defense.isin(BACKDOORBENCH_CIFAR10_BADNETS)
                    & ~rows.defense_variant.isin([variants[d] for d in BACKDOORBENCH_CIFAR10_BADNETS])]
    if not controls.empty:
        lines += ["\nOther variants in the same folders (controlled changes, not cells of the table):\n",
                  "| variant | ours CA / ASR | our victim's CA | seeds |", "|---|---:|---:|---:|"]
        for variant, group in controls.groupby("defense_variant", sort=True):
            acc, asr, victim_acc, count = ours(group)
            lines.append(f"| {variant} | {acc:.2f} / {asr:.2f} | {victim_acc:.2f} | {count} |")
    return lines


def quant_table(results: pd.DataFrame) -> list[str]:
    rows = results[(results.attack == "badnets") & (results.defense == "none") & (results.status == "ok")]
    lines = ["| data set | precision | published CA / ASR | ours CA / ASR | seeds |", "|---|---|---:|---:|---:|"]
    for (dataset, precision), (pub_acc, pub_asr) in QUANT_BLINDSPOTS.items():
        mine = rows[(rows.dataset.str.split("(").str[0] == dataset) & (rows.precision == precision)]
        if mine.empty:
            lines.append(f"| {dataset} | {precision} | {pub_acc:.1f} / {pub_asr:.1f} | not run | 0 |")
            continue
        acc, asr, _, count = ours(mine)
        lines.append(f"| {dataset} | {precision} | {pub_acc:.1f} / {pub_asr:.1f} | {acc:.1f} / {asr:.1f} | {count} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", action="append", required=True, help="an output folder (repeatable)")
    parser.add_argument("--dataset", default="cifar10", help="the data set of the BackdoorBench table")
    args = parser.parse_args()
    results = pd.concat([load_results(out) for out in args.out], ignore_index=True)
    results = results.drop_duplicates("experiment_id")
    print(f"## BackdoorBench, {args.dataset}, PreAct-ResNet18, BadNets 10%\n")
    print("\n".join(backdoorbench_table(results, args.dataset)))
    print("\n## Quantization Blindspots, PreAct-ResNet18, BadNets, no defense\n")
    print("\n".join(quant_table(results)))


if __name__ == "__main__":
    main()
