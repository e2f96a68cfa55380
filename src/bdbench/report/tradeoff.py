"""The report's trade-off section: detectability against robustness (Lukas and Kerschbaum, "Pick your Poison:
Undetectability versus Robustness in Data Poisoning Attacks", 2023).

The paper's claim: an attack that poisons enough to survive repairs (robust) is detectable, and one that poisons too
little to be detected is easily repaired. A grid that sweeps an attack's poison rate from under- to over-poisoning
shows it: for each attack and rate, how often the detectors catch it and how much ASR the repairs leave.

Which defense answers what is read from the rows, never from a list of names:

- a *detector* is a defense whose rows carry a model verdict (`detected`: the detection rate is the share of
  seeds whose model it flagged) or, where it gives none, a sample-level TPR (the payload TPR, `det_payload_tpr`:
  the share of the poisoned training samples that carry the backdoor, cover samples left out, or of the triggered
  inputs it flagged, mean over seeds; `det_tpr` in rows stored before that column existed: `stats.payload_rate`);
- a *repair* is a defense that changed a model it was handed (`stats.changes_model`, the leaderboard's rule): its
  ASR left is the mean test ASR of the model it returned, its CA drop the clean accuracy it cost.

A defense can be both (NC flags and unlearns, AC flags samples and retrains on the rest). Where the grid also holds
clean models (attack `none`), the same detectors' rate on them is shown at poison rate 0: a model verdict on a
clean model and a sample-level FPR there are false alarms, and a detection rate means little without them.
"""

from __future__ import annotations

from html import escape

import pandas as pd

from bdbench.report import figures, stats

DETECTION, ASR_LEFT, CA_DROP = "detection", "ASR left", "CA drop"
FLAG_RATE, TPR = "flag rate", "TPR"
UNDEFENDED = "ASR undefended"
COLUMNS = ["attack", "poison_rate", "defense", "measure", "metric", "value", "seeds"]


def _attack_key(rows: pd.DataFrame) -> pd.Series:
    """The attack's variant, with the precision where precision varies (a curve never mixes precisions)."""
    if stats.varies(rows, "precision"):
        return rows["attack"].astype(str) + " @ " + rows["precision"].astype(str)
    return rows["attack"].astype(str)


def swept_attacks(rows: pd.DataFrame) -> list[str]:
    """The attacks (as `_attack_key` names them) that hold ok rows at more than one poison rate."""
    hit = stats.attacked(stats.ok_rows(rows))
    if hit.empty:
        return []
    rates = hit.assign(_attack=_attack_key(hit)).groupby("_attack")["poison_rate"].nunique()
    return sorted(rates.index[rates > 1])


def has_tradeoff(rows: pd.DataFrame) -> bool:
    return bool(swept_attacks(rows))


def _roles(good: pd.DataFrame) -> dict[str, tuple[str | None, bool]]:
    """Per defense: its detection metric (`FLAG_RATE`, `TPR` or None) and whether it is a repair."""
    roles = {}
    for defense, group in good.groupby("defense", sort=True):
        if stats.numeric(group["detected"]).notna().any():
            metric: str | None = FLAG_RATE
        elif stats.payload_rate(group, "det_tpr").notna().any():
            metric = TPR
        else:
            metric = None
        roles[str(defense)] = (metric, stats.changes_model(group))
    return roles


def _seed_mean(group: pd.DataFrame, values: pd.Series) -> tuple[float, int]:
    """The mean over seeds of the per-seed mean of `values` (NaN where none), and how many seeds have one."""
    per_seed = pd.DataFrame({"seed": group["seed"], "v": stats.numeric(values)}).dropna().groupby("seed")["v"].mean()
    return (float(per_seed.mean()) if len(per_seed) else float("nan")), len(per_seed)


def tradeoff_points(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per (swept attack, poison rate, defense, measure): `measure` is detection (`metric` flag rate or
    TPR), ASR left or CA drop (metric ASR, CA); poison rate 0 holds the detectors' rate on clean models. The
    undefended reference is the line of defense `none` with measure ASR left: the deployed model's ASR before any
    defense (`asr_before`), over every row of the cell. Means over seeds; `seeds` counts them."""
    good = stats.ok_rows(rows)
    swept = swept_attacks(rows)
    if not swept:
        return pd.DataFrame(columns=COLUMNS)
    good = good.assign(_attack=_attack_key(good))
    roles = _roles(good)
    lines = []
    hit = stats.attacked(good)
    for (attack, rate), cell in hit[hit["_attack"].isin(swept)].groupby(["_attack", "poison_rate"], sort=True):
        before, n = _seed_mean(cell, cell["asr_before"])
        lines.append([attack, float(rate), "none", ASR_LEFT, "ASR", before, n])
        for defense, group in cell.groupby("defense", sort=True):
            metric, repairs = roles.get(str(defense), (None, False))
            if metric is not None:
                column = group["detected"] if metric == FLAG_RATE else stats.payload_rate(group, "det_tpr")
                lines.append([attack, float(rate), defense, DETECTION, metric, *_seed_mean(group, column)])
            if repairs:
                lines.append([attack, float(rate), defense, ASR_LEFT, "ASR", *_seed_mean(group, group["asr"])])
                lines.append([attack, float(rate), defense, CA_DROP, "CA", *_seed_mean(group, stats.ca_drop(group))])
    clean = stats.benign(good)
    for attack in swept:
        precision = attack.rsplit(" @ ", 1)[1] if stats.varies(good, "precision") else None
        part = clean if precision is None else clean[clean["precision"].astype(str) == precision]
        for defense, group in part.groupby("defense", sort=True):
            metric, _ = roles.get(str(defense), (None, False))
            if metric is not None:  # false alarms: a verdict on a clean model, or the sample-level FPR
                column = group["detected"] if metric == FLAG_RATE else stats.payload_rate(group, "det_fpr")
                lines.append([attack, 0.0, defense, DETECTION, metric, *_seed_mean(group, column)])
    return pd.DataFrame(lines, columns=COLUMNS)


def _column_name(defense: str, measure: str, metric: str) -> str:
    if defense == "none" and measure == ASR_LEFT:
        return UNDEFENDED
    return f"{defense}: {metric if measure == DETECTION else measure}"


def attack_table(points: pd.DataFrame, attack: str) -> pd.DataFrame:
    """One attack's points as a table: a line per poison rate (the clean model's false alarms first, at 0), the
    undefended ASR, then each detector's detection rate and each repair's ASR left and CA drop."""
    part = points[points["attack"] == attack]
    label = pd.Series([_column_name(d, m, k) for d, m, k in zip(part["defense"], part["measure"], part["metric"])],
                      index=part.index)
    order = {DETECTION: 1, ASR_LEFT: 2, CA_DROP: 3}
    ranks = {c: (c != UNDEFENDED, order[m], c) for c, m in zip(label, part["measure"])}
    columns = sorted(ranks, key=ranks.__getitem__)
    table = part.assign(_column=label).pivot_table(index="poison_rate", columns="_column", values="value",
                                                   aggfunc="first", dropna=False)
    table = table.reindex(columns=columns).reset_index().rename(columns={"poison_rate": "poison rate"})
    table.columns.name = None
    return table


def tradeoff_section(rows: pd.DataFrame) -> str:
    """Per swept attack: the curves (detection rate, ASR left) against the poison rate, and the table."""
    from bdbench.report.page import html_table  # the page imports this module

    points = tradeoff_points(rows)
    if points.empty:
        return '<p class="empty">No attack was run at more than one poison rate: no trade-off to draw.</p>'
    figures_html, tables = [], []
    for attack in sorted(points["attack"].unique()):
        part = points[points["attack"] == attack]
        figures_html.append(f"<div>{figures.tradeoff_curves(part, attack)}</div>")
        tables.append(f"<h3>{escape(attack)}</h3>" + f'<div class="scroll">{html_table(attack_table(points, attack))}'
                      "</div>")
    note = ("Detection against robustness (Lukas and Kerschbaum, “Pick your Poison”, 2023): per attack and poison "
            "rate, the detection rate of each detector (flag rate: share of seeds whose model a model detector "
            "called backdoored; TPR: share of the payload training samples, those that carry the backdoor, cover "
            "samples left out, or of the triggered inputs a data or input detector flagged) and the ASR each repair "
            "(a defense that changed the model) left, with the clean accuracy it cost. Poison rate 0 is the clean "
            "model: every flag there is a false alarm (for TPR detectors, their FPR on it). Means over seeds. The "
            "paper's claim: an attack strong enough to survive the repairs is detected, and one that evades detection "
            "is repaired.")
    return ("".join(figures_html) + "".join(tables)
            + f'<p class="note">{escape(note)}</p>')


__all__ = ["attack_table", "has_tradeoff", "swept_attacks", "tradeoff_points", "tradeoff_section"]
