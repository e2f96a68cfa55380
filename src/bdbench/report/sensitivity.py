"""The report's sensitivity section: how much a defense's outcome depends on its hyperparameters, and the oracle gap
(the SoK "The Last Line of Defense: On Backdoor Defense Evaluation", Abad et al. 2025, which asks evaluations to
report hyperparameter sensitivity and to choose hyperparameters without test data).

A grid lists one defense at several settings (entries with parameters; each row's `defense_variant` names its
setting, e.g. `anp(eps=0.2)`). For every defense with more than one setting and every attacked cell (attack, poison
rate, precision), the section gives the outcome of each setting (test CA and ASR, means over seeds), the spread over
settings, and two choices of setting:

- the **defender's setting**: the defense's default, i.e. the parameters its paper prescribes (bdbench's registered
  defaults). A defender holds the deployed model and a clean budget, no triggered inputs, so it cannot rank settings
  by ASR; and where a method needs a data-driven choice (how far FP prunes, how many neurons ANP prunes, NAD's
  beta back-off), the method already makes it on the clean budget inside one run. Picking among settings by clean
  accuracy alone would pick the setting that defends least, so the rule is the default. Where a grid does not hold
  the default setting of a defense, its defender's setting is unknown and its gap is not computed.
- the **oracle setting**: the best in hindsight by test ASR, what a paper that tunes on test data reports: the
  lowest mean test ASR among the settings whose mean test CA drop (against the same model undefended) is at most
  `ORACLE_CA_TOLERANCE`, so that a setting that destroys the model does not win (ties: the smaller CA drop); where
  no setting is within it, the lowest ASR among all.

The **oracle gap** is the defender's setting's ASR minus the oracle's (ASR points a test-tuned report overstates the
defense by; negative only where the default's lower ASR came with a CA drop beyond the tolerance). It is computed
here, for the report, and never feeds back into any choice a defense makes.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

import pandas as pd

from bdbench.report import figures, stats

ORACLE_CA_TOLERANCE = 0.05
CELL = ["defense_name", "attack", "poison_rate", "precision"]
SETTING_COLUMNS = ["defense_name", "setting", "label", "order", "is_default", "attack", "poison_rate", "precision",
                   "clean_acc", "asr", "ca_drop", "seeds"]


def _registry() -> Any:
    from bdbench.defenses import DEFENSES

    return DEFENSES


def tuned_defenses(rows: pd.DataFrame) -> list[str]:
    """Registered defense names that hold ok rows at more than one setting (the reference `none` never)."""
    good = stats.ok_rows(rows)
    if good.empty or "defense_name" not in good:
        return []
    counts = good.groupby("defense_name")["defense"].nunique()
    registry = _registry()
    return sorted(str(n) for n in counts.index[counts > 1] if not registry.is_reference(str(n)))


def has_sensitivity(rows: pd.DataFrame) -> bool:
    return bool(tuned_defenses(rows))


def _settings(group: pd.DataFrame, name: str) -> pd.DataFrame:
    """A defense's settings: variant, short label (the parameters that vary among them, `*` on the default), order
    by those parameters' values, and whether it is the default."""
    from bdbench.registry import compact_value
    from bdbench.store import params_dict

    registry = _registry()
    first = group.drop_duplicates("defense")
    params = {str(v): params_dict(p) for v, p in zip(first["defense"], first["defense_params"])}
    known = name in registry
    changed = {v: registry.non_default(name, p) for v, p in params.items()}
    keys = sorted({k for c in changed.values() for k in c})
    full = {v: [registry.settings(name, p).get(k) for k in keys] for v, p in params.items()}
    try:
        ordered = sorted(params, key=lambda v: full[v])
    except TypeError:  # values of mixed types: keep a stable order by name
        ordered = sorted(params)
    lines = []
    for rank, variant in enumerate(ordered):
        is_default = known and not changed[variant]
        label = ", ".join(f"{k}={compact_value(x)}" for k, x in zip(keys, full[variant])) or variant
        lines.append({"setting": variant, "label": label + (" *" if is_default else ""), "order": rank,
                      "is_default": is_default})
    return pd.DataFrame(lines)


def setting_table(rows: pd.DataFrame) -> pd.DataFrame:
    """One line per tuned defense, setting and cell (clean models included): mean test CA, ASR and CA drop over
    seeds, and how many seeds."""
    good = stats.ok_rows(rows)
    lines = []
    for name in tuned_defenses(rows):
        group = good[good["defense_name"] == name]
        settings = _settings(group, name).set_index("setting")
        for keys, cell in group.groupby(["defense", "attack", "poison_rate", "precision"], sort=True, dropna=False):
            variant, attack, rate, precision = keys
            per_seed = cell.assign(_ca=stats.numeric(cell["clean_acc"]), _asr=stats.numeric(cell["asr"]),
                                   _drop=stats.ca_drop(cell)).groupby("seed")[["_ca", "_asr", "_drop"]].mean()
            info = settings.loc[str(variant)]
            lines.append([name, variant, info["label"], int(info["order"]), bool(info["is_default"]), attack, rate,
                          precision, *per_seed.mean(skipna=True).tolist(), len(per_seed)])
    table = pd.DataFrame(lines, columns=SETTING_COLUMNS)
    return table.sort_values(["defense_name", "attack", "poison_rate", "precision", "order"],
                             kind="stable").reset_index(drop=True)


def _oracle(cell: pd.DataFrame) -> pd.Series:
    """The best setting in hindsight by test ASR (the module docstring's rule)."""
    scored = cell.dropna(subset=["asr"])
    within = scored[scored["ca_drop"].fillna(math.inf) <= ORACLE_CA_TOLERANCE + 1e-12]
    pool = within if not within.empty else scored
    return pool.sort_values(["asr", "ca_drop", "order"], kind="stable").iloc[0]


def oracle_table(settings: pd.DataFrame) -> pd.DataFrame:
    """Per tuned defense and attacked cell: the settings' count, CA and ASR ranges, the defender's setting and the
    oracle's with their CA and ASR, and the oracle gap (defender's ASR minus oracle's; NaN without the default)."""
    attacked = settings[settings["asr"].notna()]
    lines = []
    for keys, cell in attacked.groupby(CELL, sort=True, dropna=False):
        oracle = _oracle(cell)
        default = cell[cell["is_default"]]
        chosen = default.iloc[0] if len(default) else None
        lines.append({
            **dict(zip(CELL, keys)), "settings": len(cell),
            "ca_min": cell["clean_acc"].min(), "ca_max": cell["clean_acc"].max(),
            "asr_min": cell["asr"].min(), "asr_max": cell["asr"].max(),
            "default": chosen["label"] if chosen is not None else None,
            "default_ca": chosen["clean_acc"] if chosen is not None else math.nan,
            "default_asr": chosen["asr"] if chosen is not None else math.nan,
            "oracle": oracle["label"], "oracle_ca": oracle["clean_acc"], "oracle_asr": oracle["asr"],
            "oracle_gap": chosen["asr"] - oracle["asr"] if chosen is not None else math.nan,
            "seeds": int(cell["seeds"].min()),
        })
    return pd.DataFrame(lines)


def _ranges(table: pd.DataFrame) -> pd.DataFrame:
    """The oracle table as the page shows it: ranges as text, precision and rate only where they vary."""
    from bdbench.report.page import fmt

    shown = pd.DataFrame({"defense": table["defense_name"], "attack": table["attack"]})
    for column, header in (("poison_rate", "poison rate"), ("precision", "precision")):
        if stats.varies(table, column):
            shown[header] = table[column]
    shown["CA range"] = [f"{fmt(lo)} – {fmt(hi)}" for lo, hi in zip(table["ca_min"], table["ca_max"])]
    shown["ASR range"] = [f"{fmt(lo)} – {fmt(hi)}" for lo, hi in zip(table["asr_min"], table["asr_max"])]
    for who, prefix in (("defender's setting", "default"), ("oracle setting", "oracle")):
        shown[who] = table[prefix].to_numpy()
        shown[f"{who.split()[0]} CA / ASR"] = [f"{fmt(ca)} / {fmt(asr)}" for ca, asr in
                                               zip(table[f"{prefix}_ca"], table[f"{prefix}_asr"])]
    shown["oracle gap (ASR)"] = table["oracle_gap"].to_numpy()
    shown["seeds"] = table["seeds"].to_numpy()
    return shown


def sensitivity_section(rows: pd.DataFrame) -> str:
    """The settings figure per defense, the oracle table and the per-setting table."""
    from bdbench.report.page import html_table  # the page imports this module

    settings = setting_table(rows)
    if settings.empty:
        return '<p class="empty">No defense was run at more than one setting: no sensitivity to show.</p>'
    parts = [figures.sensitivity_panels(settings)]
    oracle = oracle_table(settings)
    if oracle.empty:
        parts.append('<p class="empty">No backdoored model among these settings: no ASR, no oracle gap.</p>')
    else:
        parts.append(f'<div class="scroll">{html_table(_ranges(oracle))}</div>')
    detail = settings.rename(columns={"defense_name": "defense", "label": "setting (* default)",
                                      "poison_rate": "poison rate", "clean_acc": "CA", "asr": "ASR",
                                      "ca_drop": "CA drop"})
    detail = detail[["defense", "setting (* default)", "attack", "poison rate", "precision", "CA", "ASR", "CA drop",
                     "seeds"]]
    parts.append(f'<h3>Every setting</h3><div class="scroll">{html_table(detail)}</div>')
    note = (f"Each defense at each of its settings (means over seeds; * marks the default). The defender's setting "
            f"is the default: the parameters the defense's paper prescribes, since a defender has no triggered data "
            f"to rank settings by ASR (data-driven choices such as FP's pruning stop are made on the clean budget "
            f"inside each run). The oracle setting is the best in hindsight by test ASR among settings whose CA "
            f"drop is at most {ORACLE_CA_TOLERANCE:g} (all settings where none is), what a paper that tunes on "
            f"test data reports. The oracle gap is the defender's ASR minus the oracle's: how much a test-tuned "
            f"number flatters the defense. It is computed for this report only and chooses nothing.")
    parts.append(f'<p class="note">{escape(note)}</p>')
    return "".join(parts)


__all__ = ["ORACLE_CA_TOLERANCE", "has_sensitivity", "oracle_table", "sensitivity_section", "setting_table",
           "tuned_defenses"]
