"""The report's sensitivity section (one defense at several settings): the spread and the oracle gap checked by hand
on rows written to a real results database and read back, its absence where every defense has one setting, and a
real headless-Chromium render."""

from __future__ import annotations

import math
import re

import pandas as pd
import pytest
from test_report import _row, _section, _through_sqlite, rendered_section, synthetic_rows

from bdbench.defenses import DEFENSES
from bdbench.report import write_report
from bdbench.report.sensitivity import ORACLE_CA_TOLERANCE, oracle_table, setting_table, tuned_defenses
from bdbench.report.stats import by_variant
from bdbench.store import COLUMNS

CA_BEFORE, ASR_BEFORE = 0.96, 1.0
# defense -> (params, mean CA, mean ASR) per setting; seed 0 and seed 1 sit 0.02 either side of the ASR mean.
SETTINGS = {
    "nc": [({"unlearning_fraction": 0.4}, 0.93, 0.05), ({}, 0.94, 0.20), ({"unlearning_fraction": 0.1}, 0.95, 0.30)],
    # FP at 0.2 has the lowest ASR but costs 0.16 CA, beyond the oracle's tolerance: the default is the oracle.
    "fp": [({"max_accuracy_drop": 0.05}, 0.95, 0.90), ({}, 0.93, 0.60), ({"max_accuracy_drop": 0.2}, 0.80, 0.0)],
    # NAD's default beta is a tuple, a grid's a list: they still sort by value.
    "nad": [({"beta": [0, 0, 10000]}, 0.90, 0.10), ({}, 0.94, 0.25), ({"beta": [0, 0, 1000]}, 0.95, 0.90)],
    # ANP without its default setting: the defender's choice is unknown.
    "anp": [({"eps": 0.2}, 0.95, 0.40), ({"eps": 0.6}, 0.90, 0.10)],
}


def sensitivity_rows() -> pd.DataFrame:
    rows = []
    for seed in (0, 1):
        for attack in ("none", "badnets"):
            backdoored = attack != "none"
            rows.append(_row(experiment_id=f"none-{attack}-{seed}", attack=attack, defense="none", seed=seed,
                             clean_acc=CA_BEFORE, clean_acc_before=CA_BEFORE, asr=ASR_BEFORE if backdoored else None,
                             asr_before=ASR_BEFORE if backdoored else None, poison_rate=0.1 if backdoored else 0.0))
            for defense, settings in SETTINGS.items():
                for params, ca, asr in settings:
                    variant = DEFENSES.variant(defense, params)
                    rows.append(_row(
                        experiment_id=f"{variant}-{attack}-{seed}", attack=attack, defense=defense,
                        defense_params=params, defense_variant=variant, defense_kind="model_repair", seed=seed,
                        poison_rate=0.1 if backdoored else 0.0, clean_acc=ca, clean_acc_before=CA_BEFORE,
                        asr=max(0.0, asr + (0.02 if seed else -0.02)) if backdoored and asr else
                        (0.0 if backdoored else None), asr_before=ASR_BEFORE if backdoored else None))
    return pd.DataFrame(rows, columns=list(COLUMNS))


@pytest.fixture
def stored(tmp_path) -> pd.DataFrame:
    return _through_sqlite(tmp_path, sensitivity_rows())


def test_settings_are_ordered_by_their_parameter_and_the_default_is_marked(stored):
    rows = by_variant(stored)
    assert tuned_defenses(rows) == ["anp", "fp", "nad", "nc"]  # `none` is never a tuned defense
    settings = setting_table(rows)
    nc = settings[(settings["defense_name"] == "nc") & (settings["attack"] == "badnets")]
    assert list(nc["label"]) == ["unlearning_fraction=0.1", "unlearning_fraction=0.2 *", "unlearning_fraction=0.4"]
    assert list(nc["asr"].round(6)) == [0.30, 0.20, 0.05] and list(nc["seeds"]) == [2, 2, 2]
    assert list(nc["ca_drop"].round(6)) == [0.01, 0.02, 0.03]
    nad = settings[(settings["defense_name"] == "nad") & (settings["attack"] == "badnets")]
    assert list(nad["label"]) == ["beta=[0,0,1000]", "beta=[0,0,5000] *", "beta=[0,0,10000]"]
    clean = settings[(settings["defense_name"] == "fp") & (settings["attack"] == "none")]
    assert len(clean) == 3 and clean["asr"].isna().all()  # clean models: CA only


def test_the_oracle_gap_by_hand(stored):
    table = oracle_table(setting_table(by_variant(stored))).set_index("defense_name")
    assert ORACLE_CA_TOLERANCE == 0.05  # the tolerance the numbers below were worked out for
    nc, fp, anp = table.loc["nc"], table.loc["fp"], table.loc["anp"]
    # NC: every setting within the tolerance; the oracle is the lowest ASR, 0.4; the default leaves 0.20.
    assert nc["oracle"] == "unlearning_fraction=0.4" and nc["default"] == "unlearning_fraction=0.2 *"
    assert nc["oracle_gap"] == pytest.approx(0.15) and nc["oracle_asr"] == pytest.approx(0.05)
    assert (nc["asr_min"], nc["asr_max"]) == (pytest.approx(0.05), pytest.approx(0.30))
    assert (nc["ca_min"], nc["ca_max"]) == (pytest.approx(0.93), pytest.approx(0.95))
    # FP: 0.2 reaches ASR 0 at a CA drop of 0.16, beyond the tolerance; among the rest the default is best.
    assert fp["oracle"] == "max_accuracy_drop=0.1 *" and fp["oracle_gap"] == pytest.approx(0.0)
    assert fp["asr_min"] == pytest.approx(0.0)  # the spread still shows the setting the oracle may not take
    # ANP: no default in the grid, so no defender's setting and no gap; eps 0.6 costs 0.06 CA, beyond the
    # tolerance, so the oracle is eps 0.2 despite its higher ASR.
    assert pd.isna(anp["default"]) and math.isnan(anp["oracle_gap"]) and anp["oracle"] == "eps=0.2"
    assert list(table["settings"]) == [2, 3, 3, 3] and set(table["seeds"]) == {2}


def test_the_section_appears_only_for_a_defense_at_several_settings(stored, tmp_path):
    html = write_report(stored, tmp_path / "s.html").read_text()
    section = _section(html, "sensitivity")
    assert section.count("<svg") == 1 and 'href="#sensitivity"' in html
    assert re.search(r"<th>oracle gap \(ASR\)</th>", section) and "unlearning_fraction=0.4" in section
    defaults_only = stored[stored["defense_params"].map(lambda p: not p) | (stored["defense"] == "none")]
    single = write_report(defaults_only, tmp_path / "one.html").read_text()
    assert 'id="sensitivity"' not in single and 'href="#sensitivity"' not in single
    assert 'id="sensitivity"' not in write_report(synthetic_rows(), tmp_path / "p.html").read_text()


def test_the_sensitivity_report_renders_in_headless_chromium(stored, tmp_path):
    section = rendered_section(stored, tmp_path, "sensitivity")
    assert section.count("<svg") == 1 and "oracle gap (ASR)" in section
