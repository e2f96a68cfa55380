"""Assemble the single self-contained HTML page from the summary tables and figures."""

from __future__ import annotations

import datetime as _dt
import math
from html import escape
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from bdbench.errors import BdbenchError
from bdbench.report import figures, stats
from bdbench.report.assets import CSS, ERROR_TRAP, TABLE_SCRIPT
from bdbench.report.federated import federated_section, has_federated
from bdbench.report.sensitivity import has_sensitivity, sensitivity_section
from bdbench.report.tradeoff import has_tradeoff, tradeoff_section
from bdbench.schema import REPORT_COLUMNS

# Columns of the every-experiment table, in reading order (from the result schema; the long identifier last);
# long JSON columns (spec) stay in the database.
EXPERIMENT_COLUMNS = [c for c in REPORT_COLUMNS if c != "experiment_id"] + ["experiment_id"]
SECTIONS = [("leaderboard", "Leaderboard"), ("heatmaps", "ASR and CA drop"), ("detection", "Detection"),
            ("tradeoff", "Trade-off"), ("sensitivity", "Sensitivity"), ("precision", "Precision"), ("cost", "Cost"),
            ("federated", "Federated"), ("experiments", "All experiments"), ("failures", "Errors and not applicable")]


def fmt(value: object, digits: int = 3) -> str:
    """A cell's text: numbers rounded, missing values as an en dash, everything escaped."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if stats.finite(value):
        return f"{float(value):.{digits}f}"
    return escape(str(value))


def _cell(value: object, digits: int = 3) -> str:
    if stats.finite(value) and not isinstance(value, bool):
        return f'<td class="num" data-value="{float(value)!r}">{fmt(value, digits)}</td>'
    if isinstance(value, float):  # a missing number: keep the dash in the numbers' column alignment
        return f'<td class="num">{fmt(value, digits)}</td>'
    return f"<td>{fmt(value, digits)}</td>"


def html_table(frame: pd.DataFrame, headers: dict[str, str] | None = None, table_id: str | None = None,
               row_class: Iterable[str] | None = None) -> str:
    """A plain HTML table of a DataFrame, every value escaped."""
    headers = headers or {}
    classes = list(row_class) if row_class is not None else [""] * len(frame)
    head = "".join(f"<th>{escape(headers.get(c, str(c)))}</th>" for c in frame.columns)
    body = []
    for css, record in zip(classes, frame.itertuples(index=False)):
        cells = "".join(_cell(v) for v in record)
        body.append(f'<tr class="{escape(css)}">{cells}</tr>' if css else f"<tr>{cells}</tr>")
    id_attr = f' id="{escape(table_id)}"' if table_id else ""
    return f"<table{id_attr}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _empty(text: str) -> str:
    return f'<p class="empty">{escape(text)}</p>'


def leaderboard_section(rows: pd.DataFrame) -> str:
    """Defenses that changed a model, ranked by mean DER, with the interval, CA drop, ASR after, benign flags and
    cost; defenses that changed none are named below it and judged in the detection section instead."""
    hit = stats.attacked(stats.ok_rows(rows))
    if hit.empty:
        return _empty("No successful experiments on backdoored models: nothing to rank.")
    board = stats.leaderboard(rows)
    ranked = board[board["ranked"] & (board["n"] > 0)]
    unranked = sorted(set(board.loc[~board["ranked"] & ~board["is_none"], "defense"]))
    skipped = ""
    if unranked:
        skipped = (f"Not ranked by DER: {', '.join(unranked)}. They changed no model (an input-time detector, a "
                   "detector without a repair, or one that flagged nothing), so their DER is 0.5 by construction; "
                   "the Detection section judges them.")
    if ranked.empty:
        return _empty(f"{len(hit)} successful experiment{'s'[:len(hit) != 1]} on backdoored models, but no defense "
                      "in them changed a model: nothing to rank by DER.") \
            + (f'<p class="note">{escape(skipped)}</p>' if skipped else "")
    shown = pd.DataFrame({"rank": range(1, len(ranked) + 1), "defense": ranked["defense"].to_numpy()})
    if "precision" in ranked:
        shown["precision"] = ranked["precision"].to_numpy()
    shown["n"] = ranked["n"].to_numpy()
    shown["DER mean"] = ranked["der_mean"].to_numpy()
    shown["95% interval"] = [f"{fmt(lo)} – {fmt(hi)}" if not math.isnan(lo) else "– (n<2)"
                             for lo, hi in zip(ranked["der_low"], ranked["der_high"])]
    for column, source in (("CA drop", "ca_drop"), ("ASR after", "asr_after"), ("benign FP rate", "benign_fp"),
                           ("defense time (s)", "defense_s")):
        shown[column] = ranked[source].to_numpy()
    per = "seeds, attacks and poison rates, per precision" if "precision" in ranked else \
        "seeds, attacks, poison rates and precisions"
    note = (f"DER (defense effectiveness rating, 0.5 = no change, higher is better) averaged over every successful "
            f"backdoored cell of a defense: {per}; n counts those cells. Only defenses that changed a model are "
            f"ranked. The interval is a {stats.INTERVAL_NAME} (t quantile with n-1 degrees of freedom), clipped to "
            f"DER's range [0, 1]; cells are not independent across attacks, so read it as a spread, not a test. CA "
            f"drop is clean accuracy lost against the same deployed model undefended (all ok cells, clean models "
            f"included). The benign FP rate is the share of clean models (attack = none) that the defense flagged, "
            f"or its sample-level FPR on clean data where it gives no model verdict. Error and not-applicable rows "
            f"are excluded and listed at the end.")
    classes = ["rank1" if i == 0 else "" for i in range(len(shown))]
    return (html_table(shown, row_class=classes) + f'<p class="note">{escape(note)}</p>'
            + (f'<p class="note">{escape(skipped)}</p>' if skipped else ""))


def _defense_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Where precision varies, a heatmap row is a defense at one precision (`ft @ int8-static`), never a mean over
    precisions; rows are in precision order."""
    if not stats.varies(rows, "precision"):
        return rows
    order = {p: i for i, p in enumerate(stats.precision_order(rows["precision"]))}
    rows = rows.assign(defense=rows["defense"].astype(str) + " @ " + rows["precision"].astype(str),
                       _rank=rows["precision"].map(order))
    return rows.sort_values(["_rank", "defense"], kind="stable").drop(columns="_rank")


def heatmap_section(rows: pd.DataFrame) -> str:
    """ASR after the defense and CA drop, per defense x attack."""
    good = _defense_rows(stats.ok_rows(rows))
    hit = stats.attacked(good)
    ordered = stats.varies(good, "precision")
    asr = stats.grid_mean(hit, hit["asr"], "defense", "attack", keep_order=ordered)
    drop = stats.grid_mean(good, stats.ca_drop(good), "defense", "attack", keep_order=ordered)
    parts = []
    parts.append(figures.heatmap(asr, "ASR after defense (lower is better)", "attack success rate", 0.0, 1.0)
                 if not asr.empty else _empty("No ASR numbers: no successful experiment on a backdoored model."))
    if drop.empty:
        parts.append(_empty("No CA drop numbers: no successful experiment with an undefended reference."))
    else:
        limit = max(0.05, float(abs(drop.to_numpy()).max()))
        parts.append(figures.heatmap(drop, "Clean-accuracy drop (lower is better)", "CA before − CA after",
                                     min(0.0, float(drop.min().min())), limit))
    over = "seeds and poison rates, one row per defense and precision" if stats.varies(good, "precision") \
        else "seeds, poison rates and precisions"
    note = f"Means over {over}; n/a marks a cell with no successful run."
    return '<div class="figrow">' + "".join(f"<div>{p}</div>" for p in parts) + f'</div><p class="note">{note}</p>'


_DETECTION_HEADERS = {"det_tpr": "TPR", "det_fpr": "FPR", "det_auroc": "AUROC", "flag_rate": "model flag rate"}
_NAIVE_HEADERS = {"naive_tpr": "naive TPR", "naive_flag_rate": "naive flag rate",
                  "blocked": "rows a naive harness loses", "rows": "rows"}


def detection_section(rows: pd.DataFrame) -> str:
    """Detection quality on backdoored models and the flag rate on clean ones."""
    good = stats.ok_rows(rows)
    split = ["precision"] if stats.varies(good, "precision") else []
    on_attacked = stats.detection_table(stats.attacked(good), ["defense", "attack"] + split)
    on_benign = stats.detection_table(stats.benign(good), ["defense"] + split)
    if on_attacked.empty and on_benign.empty:
        return _empty("No defense in these results reports detections (no TPR, FPR, AUROC or verdicts).")
    parts = ["<h3>On backdoored models</h3>"]
    parts.append(html_table(on_attacked, _DETECTION_HEADERS) if not on_attacked.empty
                 else _empty("No detection results on backdoored models."))
    parts.append("<h3>On clean models (benign false positives)</h3>")
    parts.append(html_table(on_benign, _DETECTION_HEADERS) if not on_benign.empty
                 else _empty("No detection results on clean models: the benign false-positive rate is unknown."))
    if split:
        parts.append('<p class="note">One line per precision: detection is never averaged across precisions.</p>')
    parts.append('<p class="note">TPR/FPR/AUROC score suspicion of training samples or inputs against the payload, '
                 'the poisoned samples that carry the backdoor, and the triggered test inputs: a cover sample '
                 '(a trigger under its true label, from adaptive_blend, adaptive_patch or source_specific) that a '
                 'cleanser flags counts as a false positive, as in Qi et al.’s elimination and sacrifice rates '
                 '(columns det_payload_tpr and det_payload_fpr; det_tpr, in the table of every experiment, counts it '
                 'as detected). Rows stored before those columns existed are scored on the whole poison mask. The '
                 'model flag rate is the share of models a model-level detector called backdoored (on clean models '
                 'every flag is a false positive).</p>')
    return "".join(parts)


def precision_section(rows: pd.DataFrame) -> str:
    """Clean accuracy, ASR and detection per deployed precision."""
    table = stats.precision_table(rows)
    if table.empty:
        return _empty("No successful experiments: nothing to show per precision.")
    precisions = stats.precision_order(table["precision"])
    parts = []
    if len(precisions) == 1:
        parts.append(_empty(f"Only one precision in these results ({precisions[0]}): "
                            "no comparison across precisions to draw."))
    else:
        parts.append(figures.precision_bars(table))
    headers = {"clean_acc": "CA after", "clean_acc_before": "CA before", "asr": "ASR after", "asr_before": "ASR before"}
    parts.append(html_table(table, headers))
    by = ["precision", "defense", "attack"]
    detection = stats.detection_table(stats.ok_rows(rows), by)
    parts.append("<h3>Detection per precision</h3>")
    if detection.empty:
        parts.append(_empty("No detection results to split by precision."))
        return "".join(parts)
    detection = detection.merge(stats.naive_detection_table(rows, by), on=by, how="left")
    detection[["blocked", "rows"]] = detection[["blocked", "rows"]].astype("Int64")  # counts, NA where no verdict
    parts.append(html_table(detection, {**_DETECTION_HEADERS, **_NAIVE_HEADERS}))
    parts.append('<p class="note">The naive columns are what a harness without a gradient check would have '
                 "reported: rows whose deployed model passed no input gradient (run here on its straight-through "
                 "twin), errors and not-applicable rows all counted as “not detected”. The gap between them and "
                 "the measured columns is the tooling artefact, not the quantization.</p>")
    return "".join(parts)


def cost_section(rows: pd.DataFrame) -> str:
    """What each defense costs against what it buys."""
    hit = stats.attacked(stats.ok_rows(rows))
    usable = hit.dropna(subset=["der"])
    usable = usable[usable["defense_s"].notna() | usable["peak_rss_mb"].notna()]
    if usable.empty:
        return _empty("No cost measurements on backdoored models with a DER.")
    return (figures.cost_scatter(usable) + '<p class="note">One point per successful backdoored cell. Time is the '
            "defense's own wall-clock time; memory is the process's peak resident set size.</p>")


def experiments_section(rows: pd.DataFrame) -> str:
    """Every stored experiment, sortable by header click and filterable by text."""
    columns = [c for c in EXPERIMENT_COLUMNS if c in rows]
    frame = rows[columns]
    return ('<input id="filter" type="search" placeholder="filter: e.g. badnets int8 error" '
            'aria-label="filter experiments"><span id="filter-count" class="meta"></span>'
            f'<div class="scroll">{html_table(frame, table_id="experiment-table")}</div>'
            '<p class="note">Click a column header to sort; type words to keep rows containing all of them.</p>')


def failures_section(rows: pd.DataFrame) -> str:
    """Every error and not-applicable row with its reason, in full."""
    bad = stats.failures(rows)
    if bad.empty:
        return '<p class="empty">None: every experiment finished with status ok.</p>'
    lines = []
    for record in bad.itertuples(index=False):
        lines.append(f'<tr><td class="status-{escape(str(record.status))}">{escape(str(record.status))}</td>'
                     + "".join(_cell(v) for v in (record.defense, record.attack, record.precision, record.seed,
                                                  record.poison_rate))
                     + f'<td class="reason">{fmt(record.error)}</td><td>{fmt(record.experiment_id)}</td></tr>')
    head = "".join(f"<th>{h}</th>" for h in ["status", "defense", "attack", "precision", "seed", "poison rate",
                                              "reason", "experiment"])
    return (f'<p class="note">{len(bad)} of {len(rows)} experiments did not produce numbers; they are excluded from '
            "every average above and never counted as “not detected”.</p>"
            f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(lines)}</tbody></table>")


def _summary(rows: pd.DataFrame) -> str:
    counts = rows["status"].value_counts().to_dict() if len(rows) else {}
    status = ", ".join(f"{n} {escape(str(s))}" for s, n in sorted(counts.items())) or "none"
    datasets = ", ".join(escape(str(v)) for v in sorted(rows["dataset"].dropna().unique()))
    models = ", ".join(escape(str(v)) for v in sorted(rows["model"].dropna().unique()))
    targets = sorted(int(t) for t in stats.attacked(rows)["target_label"].dropna().unique())
    target = f" · target label{'s' if len(targets) > 1 else ''}: {', '.join(map(str, targets))}" if targets else ""
    when = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (f'<p class="meta">{len(rows)} experiments ({status}) · data set: {datasets or "–"} · '
            f"model: {models or '–'}{target} · generated {when}</p>")


def render(rows: pd.DataFrame, title: str = "bdbench report") -> str:
    """The whole page as one string: inline CSS, inline SVG figures, inline script, no external references."""
    rows = stats.by_variant(rows)
    builders = {"leaderboard": leaderboard_section, "heatmaps": heatmap_section, "detection": detection_section,
                "tradeoff": tradeoff_section, "sensitivity": sensitivity_section, "precision": precision_section,
                "cost": cost_section, "federated": federated_section, "experiments": experiments_section,
                "failures": failures_section}
    # Sections that only some grids feed: a poison-rate sweep, a defense at several settings, federated runs.
    optional = {"tradeoff": has_tradeoff, "sensitivity": has_sensitivity, "federated": has_federated}
    sections = [(key, label) for key, label in SECTIONS if key not in optional or optional[key](rows)]
    nav = "".join(f'<a href="#{key}">{escape(label)}</a>' for key, label in sections)
    body = "".join(f'<section id="{key}"><h2>{escape(label)}</h2>{builders[key](rows)}</section>'
                   for key, label in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{escape(title)}</title>"
            f"<style>{CSS}</style><script>{ERROR_TRAP}</script></head>"
            f'<body data-js-errors="script-not-run"><h1>{escape(title)}</h1>{_summary(rows)}<nav>{nav}</nav>'
            f"{body}<script>{TABLE_SCRIPT}</script></body></html>\n")


def write_page(rows: pd.DataFrame, path: str | Path, title: str = "bdbench report") -> Path:
    """Write the page atomically enough for a report: the whole text at once, parent folders created."""
    path = Path(path)
    html = render(rows, title)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(html, encoding="utf-8")
    except OSError as exc:
        raise BdbenchError(f"cannot write the report to {path} ({exc.strerror or exc}); give `bdbench report` "
                           "-o FILE.html in a folder you can write") from None
    return path
