"""Figures as inline SVG strings, drawn off-screen with matplotlib's Agg-family backends."""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # never open a window or need a display, also on headless CI

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

# Okabe-Ito: distinguishable under the common colour-vision deficiencies; markers double the encoding.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
_STYLE: dict[RcKeyType, Any] = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "svg.fonttype": "none",
          "axes.spines.top": False, "axes.spines.right": False, "svg.hashsalt": "bdbench"}


def _to_svg(figure: plt.Figure) -> str:
    """Serialise and close a figure; the XML prolog, doctype and RDF metadata are dropped so it inlines cleanly."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(figure)
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    return svg.replace("<svg ", '<svg class="figure" role="img" ', 1)


def heatmap(table: pd.DataFrame, title: str, colorbar_label: str, vmin: float | None = None,
            vmax: float | None = None) -> str:
    """A defense x attack heatmap with the value printed in every cell (cividis, readable in grey too)."""
    values = table.to_numpy(dtype=float)
    n_rows, n_cols = values.shape
    with plt.rc_context(_STYLE):
        figure, axes = plt.subplots(figsize=(1.3 * n_cols + 2.6, 0.55 * n_rows + 1.4))
        masked = np.ma.masked_invalid(values)
        image = axes.imshow(masked, cmap="cividis", vmin=vmin, vmax=vmax, aspect="auto")
        low, high = image.get_clim()
        for i in range(n_rows):
            for j in range(n_cols):
                value = values[i, j]
                if np.isnan(value):
                    axes.text(j, i, "n/a", ha="center", va="center", color="#555555")
                    continue
                bright = (value - low) / ((high - low) or 1.0) > 0.6
                axes.text(j, i, f"{value:.2f}", ha="center", va="center",
                          color="black" if bright else "white", fontweight="bold")
        axes.set_xticks(range(n_cols), [str(c) for c in table.columns], rotation=20, ha="right")
        axes.set_yticks(range(n_rows), [str(r) for r in table.index])
        axes.set_xlabel(table.columns.name or "")
        axes.set_ylabel(table.index.name or "")
        axes.set_title(title)
        axes.spines[:].set_visible(False)
        figure.colorbar(image, ax=axes, label=colorbar_label, shrink=0.9)
        return _to_svg(figure)


def cost_scatter(rows: pd.DataFrame) -> str:
    """Defense time and peak memory against DER, one colour and marker per defense."""
    with plt.rc_context(_STYLE):
        figure, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
        for k, (defense, group) in enumerate(rows.groupby("defense", sort=True)):
            style = {"color": PALETTE[k % len(PALETTE)], "marker": MARKERS[k % len(MARKERS)], "alpha": 0.85,
                     "edgecolors": "white", "linewidths": 0.5, "s": 42, "label": str(defense)}
            axes[0].scatter(group["defense_s"], group["der"], **style)
            axes[1].scatter(group["peak_rss_mb"], group["der"], **style)
        axes[0].set_xlabel("defense time (s)")
        axes[1].set_xlabel("peak memory (MB, RSS)")
        axes[0].set_ylabel("DER (higher is better)")
        for ax in axes:
            ax.grid(alpha=0.3)
        axes[1].legend(title="defense", loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
        figure.tight_layout()
        return _to_svg(figure)


def precision_bars(table: pd.DataFrame) -> str:
    """Clean accuracy and ASR after the defense per precision, grouped by defense."""
    precisions = list(dict.fromkeys(table["precision"]))  # the table's order: fp32 first, then fewer bits
    defenses = sorted(table["defense"].unique())
    width = 0.8 / len(precisions)
    with plt.rc_context(_STYLE):
        figure, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
        for panel, (column, label) in enumerate([("clean_acc", "clean accuracy"), ("asr", "ASR after defense")]):
            ax = axes[panel]
            for k, precision in enumerate(precisions):
                part = table[table["precision"] == precision].set_index("defense").reindex(defenses)
                positions = np.arange(len(defenses)) + (k - (len(precisions) - 1) / 2) * width
                bars = ax.bar(positions, part[column].to_numpy(dtype=float), width, label=str(precision),
                              color=PALETTE[k % len(PALETTE)], hatch=["", "//", "..", "xx"][k % 4], edgecolor="white")
                ax.bar_label(bars, fmt="%.2f", fontsize=8, padding=1)
            ax.set_xticks(range(len(defenses)), defenses, rotation=20, ha="right")
            ax.set_ylim(0, 1.12)
            ax.set_title(label)
            ax.grid(axis="y", alpha=0.3)
        axes[1].legend(title="precision", loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
        figure.tight_layout()
        return _to_svg(figure)


def round_curves(curves: pd.DataFrame, title: str) -> str:
    """Benign accuracy and ASR against federated rounds, one colour and marker per server defense (`curves`:
    server_defense, round, clean_acc, asr). A setting without ASR (no attack) leaves its panel saying so."""
    with plt.rc_context(_STYLE):
        figure, axes = plt.subplots(1, 2, figsize=(9, 3.2), sharex=True)
        for k, (defense, group) in enumerate(curves.groupby("server_defense", sort=True)):
            style = {"color": PALETTE[k % len(PALETTE)], "marker": MARKERS[k % len(MARKERS)], "markersize": 4,
                     "linewidth": 1.4, "label": str(defense)}
            group = group.sort_values("round")
            axes[0].plot(group["round"], group["clean_acc"], **style)
            if group["asr"].notna().any():
                axes[1].plot(group["round"], group["asr"], **style)
        if not curves["asr"].notna().any():
            axes[1].text(0.5, 0.5, "no attack: no ASR", ha="center", va="center", transform=axes[1].transAxes,
                         color="#555555")
        for ax, label in zip(axes, ["benign accuracy", "ASR"]):
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("round")
            ax.set_title(label)
            ax.grid(alpha=0.3)
        figure.suptitle(title)
        handles, labels = axes[0].get_legend_handles_labels()  # the ASR panel may have no lines
        axes[1].legend(handles, labels, title="server defense", loc="center left", bbox_to_anchor=(1.02, 0.5),
                       frameon=False)
        figure.tight_layout()
        return _to_svg(figure)


def tradeoff_curves(points: pd.DataFrame, title: str) -> str:
    """Detection rate and ASR left against the poison rate (log scale), one colour and marker per defense
    (`points`: `report.tradeoff.tradeoff_points` of one attack). The undefended model's ASR is the dashed black
    line; a detector's rate on the clean model (poison rate 0) cannot sit on a log axis and is left to the table."""
    from bdbench.report.tradeoff import ASR_LEFT, DETECTION

    attacked = points[points["poison_rate"] > 0]
    defenses = sorted(set(attacked["defense"]) - {"none"})
    with plt.rc_context(_STYLE):
        figure, axes = plt.subplots(1, 2, figsize=(11, 3.4), sharex=True)
        for panel, measure in enumerate([DETECTION, ASR_LEFT]):
            ax = axes[panel]
            for k, defense in enumerate(defenses):
                line = attacked[(attacked["defense"] == defense) & (attacked["measure"] == measure)]
                line = line.dropna(subset=["value"]).sort_values("poison_rate")
                if line.empty:
                    continue
                label = f"{defense} ({line['metric'].iloc[0]})" if measure == DETECTION else str(defense)
                ax.plot(line["poison_rate"], line["value"], color=PALETTE[k % len(PALETTE)],
                        marker=MARKERS[k % len(MARKERS)], markersize=5, linewidth=1.4, label=label)
            ax.set_xscale("log")
            rates = sorted(attacked["poison_rate"].unique())
            ax.set_xticks(rates, [f"{100 * r:g}%" for r in rates])  # the swept rates, not decades
            ax.set_xticks([], minor=True)
            ax.set_ylim(-0.02, 1.02)
            ax.set_xlabel("poison rate")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
        undefended = attacked[(attacked["defense"] == "none") & (attacked["measure"] == ASR_LEFT)]
        undefended = undefended.sort_values("poison_rate")
        axes[1].plot(undefended["poison_rate"], undefended["value"], color="black", linestyle="--", linewidth=1.2,
                     label="undefended")
        axes[1].legend(fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
        axes[0].set_title("detection rate (higher: detected)")
        axes[1].set_title("ASR left after repair (lower: repaired)")
        figure.suptitle(title)
        figure.tight_layout()
        return _to_svg(figure)


def sensitivity_panels(settings: pd.DataFrame) -> str:
    """One panel per tuned defense: test ASR (solid, circles) and clean accuracy (dashed, squares) at each of its
    settings in parameter order, one colour per attack (`settings`: `report.sensitivity.setting_table`, means over
    seeds). The default setting (`*`) has a grey band behind it."""
    names = sorted(settings["defense_name"].unique())
    attacks = sorted(settings["attack"].astype(str).unique())
    cells = settings.assign(_cell=settings["attack"].astype(str) + settings["poison_rate"].map(
        lambda r: "" if settings["poison_rate"].nunique() < 2 else f" @{r:g}"))
    columns = min(4, len(names))
    rows = -(-len(names) // columns)
    with plt.rc_context(_STYLE):
        figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns + 1.6, 3.1 * rows), sharey=True,
                                    squeeze=False)
        for ax in axes.flat[len(names):]:
            ax.set_visible(False)
        for ax, name in zip(axes.flat, names):
            part = cells[cells["defense_name"] == name]
            order = part.drop_duplicates("setting").sort_values("order")
            position = {s: i for i, s in enumerate(order["setting"])}
            for i, is_default in enumerate(order["is_default"]):
                if is_default:
                    ax.axvspan(i - 0.4, i + 0.4, color="#dddddd", zorder=0)
            for cell, line in part.groupby("_cell", sort=True):
                k = attacks.index(str(line["attack"].iloc[0]))
                line = line.assign(_x=line["setting"].map(position)).sort_values("_x")
                colour = PALETTE[k % len(PALETTE)]
                if line["asr"].notna().any():
                    ax.plot(line["_x"], line["asr"], color=colour, marker="o", linewidth=1.4, label=f"{cell}: ASR")
                ax.plot(line["_x"], line["clean_acc"], color=colour, marker="s", linestyle="--", linewidth=1.2,
                        label=f"{cell}: CA")
            ax.set_xticks(range(len(order)), list(order["label"]), rotation=25, ha="right", fontsize=8)
            ax.set_xlim(-0.5, len(order) - 0.5)
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(str(name))
            ax.grid(alpha=0.3)
        handles, labels = axes.flat[0].get_legend_handles_labels()
        seen = dict(zip(labels, handles))
        for ax in axes.flat[1:len(names)]:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(label, handle)
        figure.legend(list(seen.values()), list(seen.keys()), loc="center left", bbox_to_anchor=(1.0, 0.5),
                      frameon=False, fontsize=8)
        figure.tight_layout()
        return _to_svg(figure)
