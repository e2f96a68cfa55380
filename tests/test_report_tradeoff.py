"""The report's trade-off section (detection against robustness over a poison-rate sweep): its numbers checked by
hand on rows written to a real results database and read back, its absence where no attack has two rates, and a
real headless-Chromium render."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from test_report import _row, _section, _through_sqlite, rendered_section, synthetic_rows

from bdbench.report import write_report
from bdbench.report.stats import by_variant
from bdbench.report.tradeoff import attack_table, swept_attacks, tradeoff_points
from bdbench.store import COLUMNS

CA_BEFORE = 0.95
KINDS = {"none": None, "mmbd": "model_detection", "strip": "input_detection", "ac": "training_data_detection",
         "ft": "model_repair"}
# (attack, rate) -> per defense, the (seed 0, seed 1) values: mmbd's verdict, strip's and ac's TPR (FPR on the clean
# model), ac's and ft's ASR after; "before" is the undefended ASR. Blended has one rate: no curve for it.
CELLS = {
    ("badnets", 0.01): {"before": (0.6, 0.8), "mmbd": (False, True), "strip": (0.2, 0.4), "ac": (0.1, 0.3),
                        "ac_asr": (0.05, 0.15), "ft_asr": (0.0, 0.1)},
    ("badnets", 0.1): {"before": (1.0, 0.98), "mmbd": (True, True), "strip": (0.9, 0.7), "ac": (0.9, 1.0),
                       "ac_asr": (0.5, 0.7), "ft_asr": (0.8, 0.6)},
    ("blended", 0.05): {"before": (0.9, 0.9), "mmbd": (True, False), "strip": (0.5, 0.5), "ac": (0.5, 0.5),
                        "ac_asr": (0.2, 0.2), "ft_asr": (0.3, 0.3)},
    ("none", 0.0): {"before": (None, None), "mmbd": (False, True), "strip": (0.02, 0.04), "ac": (0.1, 0.2),
                    "ac_asr": (None, None), "ft_asr": (None, None)},
}


def tradeoff_rows() -> pd.DataFrame:
    rows = []
    for (attack, rate), values in CELLS.items():
        for seed in (0, 1):
            before = values["before"][seed]
            for defense, kind in KINDS.items():
                row = _row(experiment_id=f"{attack}-{rate}-{defense}-{seed}", attack=attack, poison_rate=rate,
                           defense=defense, defense_kind=kind, seed=seed, clean_acc_before=CA_BEFORE,
                           clean_acc=CA_BEFORE, asr_before=before, asr=before, victim_key=f"{attack}-{rate}-{seed}")
                if defense == "mmbd":
                    row.update(detected=values["mmbd"][seed])
                elif defense in ("strip", "ac"):
                    metric = "det_fpr" if attack == "none" else "det_tpr"
                    row.update({metric: values[defense][seed]})
                if defense in ("ac", "ft") and attack != "none":  # the repairs: the model they return
                    row.update(asr=values[f"{defense}_asr"][seed], clean_acc=CA_BEFORE - 0.02 * (seed + 1))
                rows.append(row)
    return pd.DataFrame(rows, columns=list(COLUMNS))


@pytest.fixture
def stored(tmp_path) -> pd.DataFrame:
    return _through_sqlite(tmp_path, tradeoff_rows())


def test_the_trade_off_table_gives_detection_and_asr_left_per_rate_by_hand(stored):
    rows = by_variant(stored)
    assert swept_attacks(rows) == ["badnets"]  # blended ran at one rate only
    table = attack_table(tradeoff_points(rows), "badnets").set_index("poison rate")
    assert list(table.columns) == ["ASR undefended", "ac: TPR", "mmbd: flag rate", "strip: TPR", "ac: ASR left",
                                   "ft: ASR left", "ac: CA drop", "ft: CA drop"]  # strip changed no model
    assert list(table.index) == [0.0, 0.01, 0.1]  # the clean model's false alarms first
    low, high, clean = table.loc[0.01], table.loc[0.1], table.loc[0.0]
    assert low["ASR undefended"] == pytest.approx(0.7) and high["ASR undefended"] == pytest.approx(0.99)
    assert low["mmbd: flag rate"] == pytest.approx(0.5) and high["mmbd: flag rate"] == pytest.approx(1.0)
    assert low["strip: TPR"] == pytest.approx(0.3) and high["strip: TPR"] == pytest.approx(0.8)
    assert low["ac: TPR"] == pytest.approx(0.2) and high["ac: TPR"] == pytest.approx(0.95)
    assert low["ac: ASR left"] == pytest.approx(0.1) and high["ac: ASR left"] == pytest.approx(0.6)
    assert low["ft: ASR left"] == pytest.approx(0.05) and high["ft: ASR left"] == pytest.approx(0.7)
    assert low["ft: CA drop"] == pytest.approx(0.03) and high["ac: CA drop"] == pytest.approx(0.03)
    # At rate 0 the clean model: mmbd's verdicts, and the FPR of the sample-level detectors; no ASR there.
    assert clean["mmbd: flag rate"] == pytest.approx(0.5) and clean["strip: TPR"] == pytest.approx(0.03)
    assert clean["ac: TPR"] == pytest.approx(0.15) and pd.isna(clean["ASR undefended"])


def test_the_detection_rate_of_a_data_detector_is_its_payload_tpr_where_a_row_has_one(tmp_path):
    """Issue 24: cover samples a cleanser flags are no detected backdoor. ac's rows at rate 0.1 carry a payload TPR
    (half their det_tpr) and are read by it; those at 0.01 do not (stored before the column) and keep det_tpr."""
    rows = tradeoff_rows()
    scored = (rows["defense"] == "ac") & (rows["poison_rate"] == 0.1)
    rows.loc[scored, "det_payload_tpr"] = rows.loc[scored, "det_tpr"] / 2
    table = attack_table(tradeoff_points(by_variant(_through_sqlite(tmp_path, rows))), "badnets")
    table = table.set_index("poison rate")
    assert table.loc[0.1, "ac: TPR"] == pytest.approx(0.95 / 2) and table.loc[0.01, "ac: TPR"] == pytest.approx(0.2)


def test_the_section_draws_one_figure_per_swept_attack_and_only_for_a_sweep(stored, tmp_path):
    html = write_report(stored, tmp_path / "t.html").read_text()
    section = _section(html, "tradeoff")
    assert section.count("<svg") == 1 and "<h3>badnets</h3>" in section and "blended" not in section
    assert re.search(r"<th>mmbd: flag rate</th>", section) and 'href="#tradeoff"' in html
    one_rate = stored[stored["poison_rate"].isin([0.0, 0.1])]
    single = write_report(one_rate, tmp_path / "s.html").read_text()
    assert 'id="tradeoff"' not in single and 'href="#tradeoff"' not in single
    plain = write_report(synthetic_rows(), tmp_path / "p.html").read_text()
    assert 'id="tradeoff"' not in plain


def test_the_trade_off_report_renders_in_headless_chromium(stored, tmp_path):
    section = rendered_section(stored, tmp_path, "tradeoff")
    assert section.count("<svg") == 1 and "ft: ASR left" in section
