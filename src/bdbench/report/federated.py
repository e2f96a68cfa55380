"""The report's federated section: ASR and benign accuracy against rounds per server defense, and the final table
with benign federations (attack `none`) beside attacked ones.

Both read the per-round curves that a federated row carries in `round_metrics` (the store writes the same points
to the `federated_rounds` table, `bdbench.store.load_rounds`). A curve belongs to the federation's global model
(its victim), which several rows share when a grid also varies post-training defenses or precisions: each
federation counts once, by its `victim_key`. Seeds are averaged.
"""

from __future__ import annotations

from html import escape

import pandas as pd

from bdbench.report import figures, stats

NO_ATTACK = "no attack"


def federated_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """The ok rows of federated experiments, one per federation (victim)."""
    good = stats.ok_rows(rows)
    if "server_defense" not in good or "round_metrics" not in good:
        return good.iloc[0:0]
    fed = good[good["server_defense"].notna() & good["round_metrics"].map(lambda c: isinstance(c, list) and bool(c))]
    return fed.drop_duplicates("victim_key") if fed["victim_key"].notna().all() else fed


def _setting(rows: pd.DataFrame) -> pd.Series:
    """What the malicious clients did: the attack's variant, plus the federated client attack where there is one."""
    reference = stats.benign(rows).index
    client = rows["fed_client_attack"] if "fed_client_attack" in rows else pd.Series(None, index=rows.index)
    setting = rows["attack"].astype(str) + client.map(lambda c: f" + {c}" if isinstance(c, str) and c else "")
    return setting.where(~rows.index.isin(reference), NO_ATTACK)


def curves(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per federation and evaluated round: setting, split, server defense, seed, round, clean_acc, asr."""
    fed = federated_rows(rows)
    columns = ["setting", "split", "server_defense", "seed", "round", "clean_acc", "asr"]
    if fed.empty:
        return pd.DataFrame(columns=columns)
    fed = fed.assign(setting=_setting(fed))
    defense = fed["server_defense_variant"].where(fed["server_defense_variant"].notna(), fed["server_defense"])
    points = [{"setting": s, "split": split, "server_defense": d, "seed": seed, "round": p["round"],
               "clean_acc": p.get("clean_acc"), "asr": p.get("asr")}
              for s, split, d, seed, curve in zip(fed["setting"], fed["fed_split"], defense, fed["seed"],
                                                  fed["round_metrics"])
              for p in curve]
    frame = pd.DataFrame(points, columns=columns)
    frame[["clean_acc", "asr"]] = frame[["clean_acc", "asr"]].apply(stats.numeric)
    return frame


def _settings_order(values: pd.Series) -> list[str]:
    return sorted(set(values), key=lambda s: (s != NO_ATTACK, s))


def final_table(points: pd.DataFrame) -> pd.DataFrame:
    """Per server defense and split: the last round's benign accuracy of the federation without attack, then each
    attacked setting's accuracy and ASR (means over seeds), and how many seeds each mean holds at least."""
    last = points[points["round"] == points.groupby(["setting", "split", "server_defense", "seed"])["round"]
                  .transform("max")]
    means = last.groupby(["server_defense", "split", "setting"]).agg(
        clean_acc=("clean_acc", "mean"), asr=("asr", "mean"), seeds=("seed", "nunique")).reset_index()
    table = means[["server_defense", "split"]].drop_duplicates().reset_index(drop=True)
    for setting in _settings_order(means["setting"]):
        part = means[means["setting"] == setting].set_index(["server_defense", "split"])
        keys = list(zip(table["server_defense"], table["split"]))
        table[f"{setting}: CA"] = [part["clean_acc"].get(k) for k in keys]
        if setting != NO_ATTACK:
            table[f"{setting}: ASR"] = [part["asr"].get(k) for k in keys]
    seeds = means.groupby(["server_defense", "split"])["seeds"].min()
    table["seeds"] = [int(seeds[k]) for k in zip(table["server_defense"], table["split"])]
    reference = table["server_defense"].map(lambda d: d != "fedavg")  # FedAvg, the undefended server, first
    return table.assign(_order=reference).sort_values(["_order", "server_defense", "split"], kind="stable") \
        .drop(columns="_order").rename(columns={"server_defense": "server defense"}).reset_index(drop=True)


def has_federated(rows: pd.DataFrame) -> bool:
    return not federated_rows(rows).empty


def federated_section(rows: pd.DataFrame) -> str:
    """Curves per setting and split (accuracy and ASR against rounds, one line per server defense), then the final
    table."""
    from bdbench.report.page import html_table  # the page imports this module

    points = curves(rows)
    if points.empty:
        return '<p class="empty">No successful federated experiments with per-round curves.</p>'
    parts = []
    for (setting, split), group in sorted(points.groupby(["setting", "split"]), key=lambda g: (g[0][0] != NO_ATTACK,
                                                                                                g[0])):
        mean = group.groupby(["server_defense", "round"])[["clean_acc", "asr"]].mean().reset_index()
        parts.append(f"<div>{figures.round_curves(mean, f'{setting} · {split}')}</div>")
    note = ("Benign accuracy and ASR of the global model (the evaluated one: Lockdown's consensus-fused model) after "
            "each evaluated round, one line per server defense, mean over seeds. The table gives the last round: the "
            "federation without attack beside each attacked one, per server defense and split; CA is benign "
            "accuracy, ASR the share of triggered non-target test images classified as the target.")
    return (f'<div class="figrow">{"".join(parts)}</div>' + f'<div class="scroll">{html_table(final_table(points))}</div>'
            + f'<p class="note">{escape(note)}</p>')


__all__ = ["NO_ATTACK", "curves", "federated_rows", "federated_section", "final_table", "has_federated"]
