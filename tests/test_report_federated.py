"""The report's federated section: curves per server defense and the final table, checked by hand on synthetic
federated rows, its absence from centralized reports, and a real headless-Chromium render."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from test_report import _chromium, _ensure_chromium, _row, synthetic_rows

from bdbench.report import write_report
from bdbench.report.federated import curves, final_table
from bdbench.store import COLUMNS

SETTINGS = [("none", None), ("badnets", None), ("badnets", "dba")]


def _curve(clean: list[float], asr: list[float | None]) -> list[dict]:
    return [{"round": r + 1, "clean_acc": c, "asr": a, "robust_acc": None, "bytes_up": 100.0, "bytes_down": 100.0,
             "server_defense_s": 0.01} for r, (c, a) in enumerate(zip(clean, asr))]


def federated_rows() -> pd.DataFrame:
    """2 server defenses x 3 settings (no attack, BadNets, BadNets + DBA) x 2 seeds, three rounds each; the numbers
    are simple functions of the cell so that every mean below is computed by hand. Seed 1 of every cell also
    appears a second time under a post-training defense (the same federation: counted once)."""
    rows = []
    for defense in ("fedavg", "krum"):
        for attack, client in SETTINGS:
            for seed in (0, 1):
                base = 0.8 if defense == "fedavg" else 0.6
                asr = None if attack == "none" else (0.9 if defense == "fedavg" else 0.1) + (0.05 if client else 0)
                clean = [base - 0.2, base - 0.1, base + 0.02 * seed]
                asrs = [None] * 3 if asr is None else [asr / 3, asr / 2, asr + 0.02 * seed]
                victim = f"v-{defense}-{attack}-{client}-{seed}"
                for post in (["none", "ft"] if seed == 1 else ["none"]):
                    rows.append(_row(experiment_id=f"{victim}-{post}", attack=attack, defense=post, seed=seed,
                                     victim_key=victim, server_defense=defense, server_defense_variant=defense,
                                     fed_split="iid", fed_client_attack=client, fed_clients=10, rounds=3,
                                     clean_acc=clean[-1], asr=asrs[-1], round_metrics=_curve(clean, asrs)))
    return pd.DataFrame(rows, columns=list(COLUMNS))


def test_the_final_table_puts_the_benign_federation_beside_the_attacked_ones_by_hand():
    table = final_table(curves(federated_rows()))
    assert list(table.columns) == ["server defense", "split", "no attack: CA", "badnets: CA", "badnets: ASR",
                                   "badnets + dba: CA", "badnets + dba: ASR", "seeds"]
    assert list(table["server defense"]) == ["fedavg", "krum"]  # the undefended server first
    fedavg, krum = table.iloc[0], table.iloc[1]
    # last round: clean base + 0.02 seed, mean over seeds 0 and 1 -> base + 0.01 (the duplicate row counts once)
    assert fedavg["no attack: CA"] == pytest.approx(0.81) and krum["badnets: CA"] == pytest.approx(0.61)
    assert fedavg["badnets: ASR"] == pytest.approx(0.91) and fedavg["badnets + dba: ASR"] == pytest.approx(0.96)
    assert krum["badnets: ASR"] == pytest.approx(0.11) and krum["badnets + dba: ASR"] == pytest.approx(0.16)
    assert list(table["seeds"]) == [2, 2]


def test_curves_count_each_federation_once_and_keep_every_round():
    points = curves(federated_rows())
    assert len(points) == 2 * 3 * 2 * 3  # defenses x settings x seeds x rounds, not the duplicated rows
    krum_dba = points[(points.server_defense == "krum") & (points.setting == "badnets + dba")]
    assert sorted(krum_dba.groupby("round")["asr"].mean().round(6).tolist()) == [
        round(0.15 / 3, 6), round(0.15 / 2, 6), round(0.16, 6)]


def test_the_report_draws_one_figure_per_setting_and_only_for_federated_results(tmp_path):
    html = write_report(federated_rows(), tmp_path / "f.html").read_text()
    section = html[html.index('<section id="federated">'):html.index('<section id="experiments">')]
    assert section.count("<svg") == 3  # no attack, badnets, badnets + dba (one split)
    for title in ("no attack · iid", "badnets · iid", "badnets + dba · iid"):
        assert title in section
    assert "no attack: no ASR" in section and 'href="#federated"' in html
    assert re.search(r"<th>badnets \+ dba: ASR</th>", section)
    centralized = write_report(synthetic_rows(), tmp_path / "c.html").read_text()
    assert 'id="federated"' not in centralized and 'href="#federated"' not in centralized


def test_the_federated_report_renders_in_headless_chromium(tmp_path):
    binary = _ensure_chromium()
    report = write_report(federated_rows(), tmp_path / "f.html")
    dom = _chromium(binary, tmp_path / "profile", "--dump-dom", report.resolve().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    assert 'data-js-errors="0"' in body, f"page script reported errors or did not run: {body}"
    section = dom.stdout[dom.stdout.index('<section id="federated">'):]
    assert section.count("<svg") >= 3 and "badnets + dba: ASR" in section
