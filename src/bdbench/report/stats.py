"""Summary tables behind the report: pure pandas, no HTML, so the numbers can be tested by hand."""

from __future__ import annotations

import math
from typing import TypeGuard

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

CONFIDENCE = 0.95
INTERVAL_NAME = "Student-t 95% interval of the mean"
DER_RANGE = (0.0, 1.0)  # metrics.defense_effectiveness_rating: 0.5 is no change


def by_variant(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows with `attack` and `defense` replaced by their variants (`badnets(patch_size=4)`, `strip(overlays=10)`,
    or a spec's `label`), so that every table and figure groups by the setting, never pools two settings under one
    name; where the rows hold more than one target label, the attack names it too (`badnets [target 3]`). The
    registered names stay in `attack_name` and `defense_name`."""
    from bdbench.store import with_variants

    rows = with_variants(rows)
    rows["attack_name"], rows["defense_name"] = rows["attack"], rows["defense"]
    attack = rows["attack_variant"].where(rows["attack_variant"].notna(), rows["attack"])
    targets = rows.loc[~_is_reference(rows["attack_name"], "attack"), "target_label"].dropna().unique() \
        if "target_label" in rows else []
    if len(targets) > 1:
        suffix = rows["target_label"].map(lambda t: "" if pd.isna(t) else f" [target {int(t)}]")
        attack = attack.where(_is_reference(rows["attack_name"], "attack"), attack + suffix)
    rows["attack"] = attack
    rows["defense"] = rows["defense_variant"].where(rows["defense_variant"].notna(), rows["defense"])
    return rows


def _is_reference(names: pd.Series, kind: str) -> pd.Series:
    """Which rows name the reference entry of their kind (no attack, no defense), by the registry's `reference`
    attribute, not by the name."""
    from bdbench.attacks import ATTACKS
    from bdbench.defenses import DEFENSES

    registry = ATTACKS if kind == "attack" else DEFENSES
    return names.map(lambda name: isinstance(name, str) and registry.is_reference(name)).astype(bool)


def _attack_names(rows: pd.DataFrame) -> pd.Series:
    return rows["attack_name"] if "attack_name" in rows else rows["attack"]


def _defense_names(rows: pd.DataFrame) -> pd.Series:
    return rows["defense_name"] if "defense_name" in rows else rows["defense"]


def varies(rows: pd.DataFrame, column: str) -> bool:
    """Whether the rows hold more than one value of `column`: then metrics are split by it, never averaged over."""
    return column in rows and rows[column].nunique(dropna=True) > 1


def precision_order(values: pd.Series | list) -> list[str]:
    """The distinct precisions in their natural order: the registry's (fp32, then fewer bits), unknown ones last."""
    from bdbench.precision import PRECISIONS

    known = {name: i for i, name in enumerate(PRECISIONS.registered())}
    distinct = pd.Series(list(values)).dropna().unique()
    return sorted((str(v) for v in distinct), key=lambda v: (known.get(v, len(known)), v))


def by_precision(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with its rows in precision order, keeping the order within each precision."""
    if "precision" not in frame or frame.empty:
        return frame
    rank = {name: i for i, name in enumerate(precision_order(frame["precision"]))}
    order = frame["precision"].map(lambda v: rank.get(str(v), len(rank))).to_numpy()
    return frame.iloc[np.argsort(order, kind="stable")].reset_index(drop=True)


def changes_model(rows: pd.DataFrame) -> bool:
    """Whether a defense changed any model it was handed (CA or ASR after differ from before). One that never
    did (an input detector, a detector without a repair, no defense) has DER 0.5 by construction: DER does not
    rate it, its detection numbers do."""
    kinds = rows["defense_kind"] if "defense_kind" in rows else pd.Series(dtype=object)
    if len(rows) == 0 or _is_reference(_defense_names(rows), "defense").all() or (kinds == "input_detection").all():
        return False
    changed = pd.Series(False, index=rows.index)
    for after, before in (("clean_acc", "clean_acc_before"), ("asr", "asr_before")):
        gap = (numeric(rows[after]) - numeric(rows[before])).abs()
        changed |= gap.gt(1e-9).fillna(False)
    return bool(changed.any())


def ok_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows that produced numbers; errors and not-applicable rows are listed apart, never averaged."""
    return rows[rows["status"] == "ok"]


def attacked(rows: pd.DataFrame) -> pd.DataFrame:
    """Backdoored cells: DER and ASR only mean something where there is a backdoor."""
    return rows[~_is_reference(_attack_names(rows), "attack")]


def benign(rows: pd.DataFrame) -> pd.DataFrame:
    """Clean-model cells: any flag raised there is a false positive."""
    return rows[_is_reference(_attack_names(rows), "attack")]


def numeric(values: pd.Series) -> pd.Series:
    """A column as float64, NaN where missing or not a number. Verdicts (`detected`) become 0.0/1.0: a column
    whose every value is a bool would otherwise be bool-typed (pandas 3) and refuse a 0.0 written into it."""
    return pd.to_numeric(values, errors="coerce").astype("float64")


def t_interval(values: pd.Series) -> tuple[float, float, int]:
    """Mean and Student-t half-width (NaN below two values): seeds are few, so a normal interval would be too narrow."""
    values = numeric(values).dropna()
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = float(values.mean())
    if n < 2:
        return mean, math.nan, n
    half = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * values.std(ddof=1) / math.sqrt(n))
    return mean, half, n


def _mean(values: pd.Series) -> float:
    values = numeric(values).dropna()
    return float(values.mean()) if len(values) else math.nan


def benign_flag_rate(rows: pd.DataFrame) -> float:
    """Share of clean-model cells flagged: the model verdict where there is one, else the data-level FPR."""
    rows = benign(ok_rows(rows))
    detected = numeric(rows["detected"]).dropna()
    if len(detected):
        return float(detected.mean())
    return _mean(rows["det_fpr"])


def ca_drop(rows: pd.DataFrame) -> pd.Series:
    """Clean accuracy lost to the defense, against the same deployed model undefended."""
    return numeric(rows["clean_acc_before"]) - numeric(rows["clean_acc"])


def leaderboard(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per defense (per defense and precision where precision varies), over every backdoored ok cell
    (seeds x attacks x rates). `ranked` lines (defenses that changed a model) come first, by mean DER; the
    interval is clipped to DER's range."""
    good = ok_rows(rows)
    keys = ["defense"] + (["precision"] if varies(good, "precision") else [])
    lines = []
    for key, group in good.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        hit = attacked(group)
        der_mean, der_half, n = t_interval(hit["der"])
        lines.append({
            **dict(zip(keys, key)),
            "n": n,
            "der_mean": der_mean,
            "der_low": float(np.clip(der_mean - der_half, *DER_RANGE)),  # NaN (n < 2) stays NaN
            "der_high": float(np.clip(der_mean + der_half, *DER_RANGE)),
            "ca_drop": _mean(ca_drop(group)),
            "asr_after": _mean(hit["asr"]),
            "benign_fp": benign_flag_rate(group),
            "defense_s": _mean(group["defense_s"]),
            "ranked": changes_model(group),
            "is_none": bool(_is_reference(_defense_names(group), "defense").all()),
        })
    table = pd.DataFrame(lines, columns=keys + ["n", "der_mean", "der_low", "der_high", "ca_drop", "asr_after",
                                                "benign_fp", "defense_s", "ranked", "is_none"])
    return by_precision(table).sort_values(["ranked", "der_mean"], ascending=[False, False], na_position="last",
                                           kind="stable").reset_index(drop=True)  # ties in precision order


def grid_mean(rows: pd.DataFrame, values: pd.Series, index: str, columns: str,
              keep_order: bool = False) -> pd.DataFrame:
    """Mean of `values` per (index, columns) cell; empty when no cell has a number. Index values are sorted, or
    kept in the order they first appear in `rows` with `keep_order`."""
    frame = rows[[index, columns]].copy()
    frame["value"] = numeric(values)
    frame = frame.dropna(subset=["value"])
    if frame.empty:
        return pd.DataFrame()
    table = frame.pivot_table(index=index, columns=columns, values="value", aggfunc="mean")
    return table.reindex(list(dict.fromkeys(frame[index]))) if keep_order else table.sort_index()


# What "detected the backdoor" reads: a row's rates against the payload, the poisoned samples that carry the
# backdoor (a flagged cover sample, a trigger under its true label, is no detected backdoor: Qi et al.'s elimination
# and sacrifice rates), keyed by the name of the rate against the whole poison mask.
PAYLOAD_RATES = {"det_tpr": "det_payload_tpr", "det_fpr": "det_payload_fpr", "det_auroc": "det_payload_auroc"}


def payload_rate(rows: pd.DataFrame, column: str) -> pd.Series:
    """The rows' payload-scored rate for `column` (`det_payload_tpr` for `det_tpr`, ...), and `column` itself where
    a row has none: rows stored before the payload columns existed, which were scored on the whole poison mask (the
    same for attacks without cover samples)."""
    measured = numeric(rows[column])
    payload = PAYLOAD_RATES[column]
    return numeric(rows[payload]).fillna(measured) if payload in rows else measured


def detection_table(rows: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Mean payload TPR/FPR/AUROC (`payload_rate`) and flag rate per group, for rows where a detector reported
    anything; the columns keep the poison-mask names (`det_tpr`, ...)."""
    good = ok_rows(rows)
    metrics = ["det_tpr", "det_fpr", "det_auroc", "detected"]
    frame = good[by].copy()
    for column in metrics:
        frame[column] = payload_rate(good, column) if column in PAYLOAD_RATES else numeric(good[column])
    frame = frame.dropna(subset=metrics, how="all")
    if frame.empty:
        return pd.DataFrame()
    table = frame.groupby(by, sort=True)[metrics].mean().reset_index()
    table["n"] = frame.groupby(by, sort=True).size().to_numpy()
    return by_precision(table.rename(columns={"detected": "flag_rate"}))


def naive_detection_table(rows: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """What a harness without a gradient check would have reported, per group: every row that ran on
    the straight-through twin (`proxy == "ste"`: the deployed model passed no input gradient), every
    error and every not-applicable row counted as "not detected" (payload TPR 0, not flagged), the rest as
    measured. Only the metrics a defense reports somewhere are filled in; `blocked` is how many rows
    of the group such a harness would have lost."""
    metrics = ["det_tpr", "detected"]
    frame = rows[list(dict.fromkeys(by + ["defense", "status", "proxy"]))].copy()
    frame["det_tpr"], frame["detected"] = payload_rate(rows, "det_tpr"), numeric(rows["detected"])
    reported = frame[frame["status"] == "ok"].groupby("defense")[metrics].agg(lambda v: v.notna().any())
    frame = frame[frame["defense"].isin(reported.index[reported.any(axis=1)])]
    if frame.empty:
        return pd.DataFrame(columns=by + ["naive_tpr", "naive_flag_rate", "blocked", "rows"])
    blocked = (frame["status"] != "ok") | (frame["proxy"] == "ste")
    for column in metrics:
        fills = blocked & frame["defense"].map(reported[column]).astype(bool)
        frame.loc[fills, column] = 0.0
    frame["blocked"] = blocked.astype(int)
    table = frame.groupby(by, sort=True).agg(naive_tpr=("det_tpr", "mean"), naive_flag_rate=("detected", "mean"),
                                             blocked=("blocked", "sum"), rows=("blocked", "size"))
    return by_precision(table.reset_index())


def precision_table(rows: pd.DataFrame) -> pd.DataFrame:
    """Mean clean accuracy and ASR after the defense per (precision, defense), with the undefended values beside."""
    good = ok_rows(rows)
    if good.empty:
        return pd.DataFrame()
    lines = []
    for (precision, defense), group in good.groupby(["precision", "defense"], sort=True):
        hit = attacked(group)
        lines.append({"precision": precision, "defense": defense,
                      "clean_acc": _mean(group["clean_acc"]), "clean_acc_before": _mean(group["clean_acc_before"]),
                      "asr": _mean(hit["asr"]), "asr_before": _mean(hit["asr_before"]), "n": len(group)})
    return by_precision(pd.DataFrame(lines))


def failures(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows that did not produce numbers, with their reasons: shown in full, never folded into averages."""
    bad = rows[rows["status"].isin(["error", "not_applicable"])]
    columns = ["status", "defense", "attack", "precision", "seed", "poison_rate", "error", "experiment_id"]
    return bad[columns].sort_values(["status", "defense", "attack"]).reset_index(drop=True)


def finite(value: object) -> TypeGuard[int | float | np.floating | np.integer]:
    """True for a real number that is not NaN (None, strings and NaN are not)."""
    return isinstance(value, (int, float, np.floating, np.integer)) and not (isinstance(value, float) and math.isnan(value)) \
        and not (isinstance(value, np.floating) and np.isnan(value))
