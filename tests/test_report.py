"""The HTML report: numbers checked by hand, self-containment, and a real headless-Chromium render."""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bdbench.report import write_report
from bdbench.report.stats import leaderboard, naive_detection_table
from bdbench.store import COLUMNS

CHROMIUM = "/usr/bin/chromium"


def _row(**values) -> dict:
    row = {column: None for column in COLUMNS}
    row.update(dataset="mnist5k", model="cnn-small", poison_rate=0.1, target_label=0, precision="fp32",
               status="ok", attack_params="{}", defense_params="{}", clean_budget=250)
    row.update(values)
    return row


def synthetic_rows(n: int = 50) -> pd.DataFrame:
    """A 50-row grid with the real columns: 4 defenses, 3 attacks incl. none, 3 seeds, 2 precisions, failures."""
    rng = np.random.default_rng(0)
    kinds = {"none": None, "ft": "model_repair", "nc": "model_detection", "spectral": "data_detection"}
    rows = []
    combos = itertools.product([0, 1, 2], ["fp32", "int8"], ["none", "badnets", "blended"], list(kinds))
    for seed, precision, attack, defense in itertools.islice(combos, n):
        ca_before = 0.97 - (0.02 if precision == "int8" else 0.0) + rng.normal(0, 0.005)
        asr_before = None if attack == "none" else 0.95 + rng.normal(0, 0.02)
        strength = {"none": 0.0, "ft": 0.7, "nc": 0.4, "spectral": 0.5}[defense]
        clean_acc = ca_before - (0.0 if defense == "none" else abs(rng.normal(0.02, 0.01)))
        asr = None if attack == "none" else max(0.0, asr_before * (1 - strength) + rng.normal(0, 0.03))
        der = None if attack == "none" else (max(0, asr_before - asr) - max(0, ca_before - clean_acc) + 1) / 2
        row = _row(experiment_id=f"e{len(rows):03d}", attack=attack, defense=defense, defense_kind=kinds[defense],
                   precision=precision, seed=seed, clean_acc=clean_acc, clean_acc_before=ca_before, asr=asr,
                   asr_before=asr_before, der=der, defense_s=0.0 if defense == "none" else rng.uniform(1, 20),
                   peak_rss_mb=rng.uniform(300, 900), wall_s=rng.uniform(2, 30))
        if defense == "nc":
            row.update(detected=bool(attack != "none" or rng.random() < 0.3), anomaly_index=rng.uniform(0.5, 4))
        if defense == "spectral":
            row.update(det_tpr=rng.uniform(0.5, 1) if attack != "none" else None, det_fpr=rng.uniform(0, 0.2),
                       det_auroc=rng.uniform(0.6, 1) if attack != "none" else None)
        rows.append(row)
    rows[5].update(status="error", error="RuntimeError: CUDA out of memory <in nc> & friends", der=None,
                   clean_acc=None, asr=None)
    rows[29].update(status="error", error="ValueError: trigger reversal diverged", der=None, clean_acc=None, asr=None)
    rows[18].update(status="not_applicable", error="no input gradient through an int8 layer", der=None,
                    clean_acc=None, asr=None)
    rows[22].update(status="not_applicable", error="int8 model: nc needs input gradients", der=None,
                    clean_acc=None, asr=None)
    return pd.DataFrame(rows, columns=list(COLUMNS))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return write_report(synthetic_rows(), tmp_path_factory.mktemp("report") / "report.html")


def test_synthetic_grid_has_the_promised_shape():
    rows = synthetic_rows()
    assert len(rows) == 50 and list(rows.columns) == list(COLUMNS)
    assert set(rows["seed"]) == {0, 1, 2} and set(rows["precision"]) == {"fp32", "int8"}
    assert (rows["status"] == "error").sum() == 2 and (rows["status"] == "not_applicable").sum() == 2


def test_leaderboard_numbers_match_a_hand_computation(tmp_path):
    rows = pd.DataFrame([
        _row(experiment_id="a", attack="badnets", defense="ft", seed=0, der=0.6, clean_acc_before=0.9, clean_acc=0.8,
             asr=0.2, asr_before=0.9, defense_s=2.0),
        _row(experiment_id="b", attack="blended", defense="ft", seed=1, der=0.8, clean_acc_before=0.9, clean_acc=0.9,
             asr=0.4, asr_before=0.9, defense_s=4.0),
        _row(experiment_id="c", attack="none", defense="ft", seed=0, clean_acc_before=0.95, clean_acc=0.85,
             detected=True, defense_s=6.0),
        _row(experiment_id="d", attack="badnets", defense="nc", seed=0, der=0.5, clean_acc_before=0.9,
             clean_acc=0.9, asr=0.9, asr_before=0.9, defense_s=1.0),
        _row(experiment_id="e", attack="badnets", defense="nc", seed=1, status="error", error="boom", der=0.99),
    ], columns=list(COLUMNS))
    board = leaderboard(rows).set_index("defense")
    assert list(board.index) == ["ft", "nc"]  # ranked by mean DER; the error row's 0.99 is not counted
    ft = board.loc["ft"]
    half = 12.706204736 * 0.1414213562 / math.sqrt(2)  # t(0.975, 1 dof) * sd / sqrt(n)
    assert ft["n"] == 2 and ft["der_mean"] == pytest.approx(0.7)
    assert 0.7 - half < 0 and 0.7 + half > 1  # the t interval leaves DER's range [0, 1]: it is clipped to it
    assert ft["der_low"] == 0.0 and ft["der_high"] == 1.0
    assert ft["ca_drop"] == pytest.approx((0.1 + 0.0 + 0.1) / 3)
    assert ft["asr_after"] == pytest.approx(0.3)
    assert ft["benign_fp"] == pytest.approx(1.0)
    assert ft["defense_s"] == pytest.approx(4.0)
    assert board.loc["nc", "n"] == 1 and math.isnan(board.loc["nc", "der_low"])
    html = write_report(rows, tmp_path / "r.html").read_text()
    assert "<td>ft</td><td class=\"num\" data-value=\"2.0\">2</td><td class=\"num\" data-value=\"0.7\">0.700</td>" \
        in html.replace("data-value=\"2\"", "data-value=\"2.0\"")
    assert "0.000 – 1.000" in html and f"{0.7 - half:.3f}" not in html
    assert "clipped to DER&#x27;s range [0, 1]" in html
    assert board.loc["ft", "ranked"] and not board.loc["nc", "ranked"]  # nc changed no model: 0.5 by construction
    assert "Not ranked by DER: nc." in html and "<td>2</td><td>nc</td>" not in html



def test_naive_detection_counts_twin_runs_errors_and_not_applicable_as_not_detected(tmp_path):
    """The precision table's contrast: what a harness without the gradient check would have reported."""
    rows = pd.DataFrame([
        _row(experiment_id="a", attack="badnets", defense="nc", precision="fp32", detected=True),
        _row(experiment_id="b", attack="badnets", defense="nc", precision="int8", detected=True, proxy="ste"),
        _row(experiment_id="c", attack="badnets", defense="nc", precision="int8", detected=False),
        _row(experiment_id="d", attack="badnets", defense="nc", precision="int8", status="error", error="boom"),
        _row(experiment_id="e", attack="badnets", defense="ac", precision="int8", det_tpr=0.9, det_fpr=0.1,
             proxy="ste"),
        _row(experiment_id="f", attack="badnets", defense="ac", precision="int8", det_tpr=0.7, det_fpr=0.1),
        _row(experiment_id="g", attack="badnets", defense="ac", precision="int8", status="not_applicable",
             error="no twin"),
        _row(experiment_id="h", attack="badnets", defense="none", precision="int8", status="error", error="x"),
    ], columns=list(COLUMNS))
    naive = naive_detection_table(rows, ["precision", "defense"]).set_index(["precision", "defense"])
    assert list(naive.index) == [("fp32", "nc"), ("int8", "ac"), ("int8", "nc")]  # `none` detects nothing
    assert naive.loc[("fp32", "nc"), "naive_flag_rate"] == 1.0 and naive.loc[("fp32", "nc"), "blocked"] == 0
    nc = naive.loc[("int8", "nc")]
    assert nc["naive_flag_rate"] == 0.0 and nc["blocked"] == 2 and nc["rows"] == 3
    assert math.isnan(nc["naive_tpr"])  # NC never reports a TPR, so none is invented for it
    ac = naive.loc[("int8", "ac")]
    assert ac["naive_tpr"] == pytest.approx(0.7 / 3) and ac["blocked"] == 2 and math.isnan(ac["naive_flag_rate"])
    html = write_report(rows, tmp_path / "r.html").read_text()
    assert "naive flag rate" in html and "rows a naive harness loses" in html
    assert '<td class="num" data-value="2.0">2</td><td class="num" data-value="3.0">3</td>' in html  # int8 nc counts
    # An input detector on clean models only reports an FPR: no naive verdict, and the page still renders.
    clean_only = pd.DataFrame([_row(experiment_id="s", attack="none", defense="strip", precision=p, det_fpr=0.02)
                               for p in ("fp32", "int8")], columns=list(COLUMNS))
    assert naive_detection_table(clean_only, ["precision", "defense"]).empty
    assert "Detection per precision" in write_report(clean_only, tmp_path / "c.html").read_text()


def test_report_is_self_contained_and_complete(report):
    html = report.read_text(encoding="utf-8")
    assert report.stat().st_size < 5 * 1024 * 1024
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", html, re.I)
    assert not re.search(r"<script[^>]*\bsrc\s*=", html, re.I)
    assert not re.search(r"<link\b", html, re.I) and "@import" not in html
    assert not re.search(r"""url\(\s*["']?\s*(https?:)?//""", html, re.I)  # url(#clip) inside SVGs is fine
    for section in ["leaderboard", "heatmaps", "detection", "precision", "cost", "experiments", "failures"]:
        assert f'<section id="{section}">' in html
    assert html.count("<svg") >= 4  # two heatmaps, precision bars, cost scatter
    assert "Student-t" in html


def test_failures_are_listed_with_escaped_reasons(report):
    html = report.read_text(encoding="utf-8")
    failures = html[html.index('<section id="failures">'):]
    assert "CUDA out of memory &lt;in nc&gt; &amp; friends" in failures
    assert "<in nc>" not in html
    for reason in ["trigger reversal diverged", "no input gradient through an int8 layer",
                   "int8 model: nc needs input gradients"]:
        assert reason in failures
    assert failures.count('class="status-error"') == 2 and failures.count('class="status-not_applicable"') == 2


def test_sections_without_data_say_so_in_one_line(tmp_path):
    rows = synthetic_rows()
    rows = rows[(rows["precision"] == "fp32") & rows["defense"].isin(["none", "ft"]) & (rows["status"] == "ok")]
    html = write_report(rows, tmp_path / "r.html").read_text()
    assert "Only one precision in these results (fp32)" in html
    assert "No defense in these results reports detections" in html
    assert "None: every experiment finished with status ok." in html


def _ensure_chromium() -> str:
    """Chromium from Debian's package, installed here when missing so `make test` works on a fresh machine."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if shutil.which("apt-get") is None:
        pytest.skip("headless Chromium is not installed and apt-get is not available to install it")
    if os.geteuid() != 0:
        pytest.skip("headless Chromium is not installed and installing it needs root (apt-get install chromium)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    result = subprocess.run("apt-get update -qq && apt-get install -y -qq chromium", shell=True, env=env,
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0 or not os.path.exists(CHROMIUM):
        pytest.skip(f"could not install chromium with apt-get: {result.stderr.strip()[-300:]}")
    return CHROMIUM


def _chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0"]
    return subprocess.run([binary, *flags, *args], capture_output=True, text=True, timeout=120)


def rendered_section(rows: pd.DataFrame, tmp_path: Path, key: str) -> str:
    """Section `key` of the report of `rows` as headless Chromium rendered it, once the page script ran without
    errors."""
    binary = _ensure_chromium()
    report = write_report(rows, tmp_path / "rendered.html")
    dom = _chromium(binary, tmp_path / "profile-rendered", "--dump-dom", report.resolve().as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    assert 'data-js-errors="0"' in body, f"page script reported errors or did not run: {body}"
    return _section(dom.stdout, key)


def test_report_renders_in_headless_chromium(report, tmp_path):
    binary = _ensure_chromium()
    url = report.resolve().as_uri()
    started = time.perf_counter()
    dom = _chromium(binary, tmp_path / "profile-dom", "--dump-dom", url)
    open_s = time.perf_counter() - started
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body[^>]*>", dom.stdout).group(0)
    assert 'data-js-errors="0"' in body, f"page script reported errors or did not run: {body}"
    assert "Uncaught" not in dom.stderr, dom.stderr[-2000:]
    assert re.search(r'<table id="experiment-table" data-ready="50"', dom.stdout)
    assert dom.stdout.count("<svg") >= 4
    assert "50 of 50 experiments shown" in dom.stdout
    screenshot = tmp_path / "report.png"
    shot = _chromium(binary, tmp_path / "profile-shot", f"--screenshot={screenshot}", "--window-size=1400,3000", url)
    assert shot.returncode == 0 and screenshot.stat().st_size > 10_000, shot.stderr[-2000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shutil.copy(screenshot, "/tmp/bdbench-report.png")
    Path("/tmp/bdbench-report-timing.json").write_text(json.dumps(
        {"dump_dom_s": round(open_s, 3), "report_bytes": report.stat().st_size}))
    print(f"report {report.stat().st_size} bytes; headless --dump-dom open {open_s:.2f} s")


@pytest.mark.parametrize("keep", [0, 1])
def test_degenerate_results_still_give_a_page(tmp_path, keep):
    rows = synthetic_rows().iloc[:keep]  # no rows at all; a single clean model without a defense
    html = write_report(rows, tmp_path / "r.html").read_text()
    assert "No successful experiments on backdoored models: nothing to rank." in html
    assert "No cost measurements" in html and "No ASR numbers" in html
    assert html.count("<svg") == keep  # only the CA-drop heatmap of the one clean model has data


def test_cli_report_writes_the_page_and_missing_results_are_one_line(tmp_path):
    from click.testing import CliRunner

    from bdbench.cli import main
    from bdbench.store import ResultStore

    out = tmp_path / "out"
    out.mkdir()
    store = ResultStore(out / "results.sqlite")
    for record in synthetic_rows().to_dict("records"):
        store.write({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()})
    store.close()
    runner = CliRunner()
    default = runner.invoke(main, ["report", "--out", str(out)])
    assert default.exit_code == 0, default.output
    assert default.output.strip() == str(out / "report.html") and (out / "report.html").stat().st_size > 10_000
    chosen = runner.invoke(main, ["report", "--out", str(out), "-o", str(tmp_path / "sub" / "mine.html")])
    assert chosen.exit_code == 0 and (tmp_path / "sub" / "mine.html").is_file()
    assert "CUDA out of memory &lt;in nc&gt;" in (tmp_path / "sub" / "mine.html").read_text()
    missing = runner.invoke(main, ["report", "--out", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and missing.output.startswith("error: ")
    assert len(missing.output.strip().splitlines()) == 1 and "results.sqlite" in missing.output


def test_cli_run_ends_by_writing_the_report(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import bdbench.runner
    from bdbench.cli import main
    from bdbench.store import ResultStore

    out = tmp_path / "out"

    def fake_run_grid(config, out, **_):  # stands in for training: the report reads what the store holds
        Path(out).mkdir(parents=True, exist_ok=True)
        store = ResultStore(Path(out) / "results.sqlite")
        store.write({k: v for k, v in synthetic_rows().iloc[0].to_dict().items() if v is not None})
        frame = store.dataframe()
        store.close()
        return frame

    monkeypatch.setattr(bdbench.runner, "run_grid", fake_run_grid)
    ran = CliRunner().invoke(main, ["run", "demo", "--out", str(out)])
    assert ran.exit_code == 0, ran.output
    assert ran.output.strip().splitlines()[-2] == f"report: {out / 'report.html'}"
    assert ran.output.strip().splitlines()[-1].startswith("1 experiment: 1 ok; rows in ")
    assert "<section id=\"leaderboard\">" in (out / "report.html").read_text()


def _through_sqlite(tmp_path: Path, rows: pd.DataFrame) -> pd.DataFrame:
    """The rows as `bdbench report` sees them: written to a real results database and read back."""
    from bdbench.store import ResultStore, load_results

    out = tmp_path / "out"
    store = ResultStore(out / "results.sqlite")
    for record in rows.to_dict("records"):
        store.write({k: v for k, v in record.items() if not (isinstance(v, float) and math.isnan(v))})
    store.close()
    return load_results(out)


def test_every_row_with_a_verdict_gives_a_report(tmp_path):
    """Issue 27: a grid of nc rows only (every row has `detected`) made pandas 3 read the column as bool, and
    the naive table's 0.0 fill raised `Invalid value '0.0' for dtype 'bool'`, failing run and report."""
    rows = _through_sqlite(tmp_path, pd.DataFrame([
        _row(experiment_id="a", attack="badnets", defense="nc", detected=True, der=0.9, clean_acc=0.9,
             clean_acc_before=0.9, asr=0.1, asr_before=0.9),
        _row(experiment_id="b", attack="none", defense="nc", detected=False, clean_acc=0.9, clean_acc_before=0.9),
        _row(experiment_id="c", attack="badnets", defense="nc", precision="int8-dynamic", detected=True,
             proxy="ste", der=0.5, clean_acc=0.9, clean_acc_before=0.9, asr=0.9, asr_before=0.9),
    ], columns=list(COLUMNS)))
    naive = naive_detection_table(rows, ["precision", "defense"]).set_index("precision")
    assert naive.loc["int8-dynamic", "naive_flag_rate"] == 0.0 and naive.loc["fp32", "naive_flag_rate"] == 0.5
    html = write_report(rows, tmp_path / "r.html").read_text()
    assert "Detection per precision" in html and "naive flag rate" in html


def test_a_report_failure_does_not_fail_a_run_that_stored_its_rows(tmp_path, monkeypatch):
    from click.testing import CliRunner

    import bdbench.report
    import bdbench.runner
    from bdbench.cli import main
    from bdbench.store import ResultStore

    out = tmp_path / "out"

    def fake_run_grid(config, out, **_):
        store = ResultStore(Path(out) / "results.sqlite")
        store.write({k: v for k, v in synthetic_rows().iloc[1].to_dict().items() if v is not None})
        frame = store.dataframe()
        store.close()
        return frame

    def broken_report(*_, **__):
        raise TypeError("Invalid value '0.0' for dtype 'bool'")

    monkeypatch.setattr(bdbench.runner, "run_grid", fake_run_grid)
    monkeypatch.setattr(bdbench.report, "report_from_out", broken_report)
    ran = CliRunner().invoke(main, ["run", "demo", "--out", str(out)])
    assert ran.exit_code == 0, ran.output
    last = ran.output.strip().splitlines()[-2]
    assert last.startswith("report: could not be made (TypeError: Invalid value") and "bdbench report --out" in last
    assert "Traceback" not in ran.output


def _section(html: str, key: str) -> str:
    start = html.index(f'<section id="{key}">')
    return html[start:html.index("</section>", start)]


def test_leaderboard_without_a_defense_says_what_there_is(tmp_path):
    """Issue 27: backdoored rows without a defense were reported as "No successful experiments on backdoored models"."""
    rows = _through_sqlite(tmp_path, pd.DataFrame([
        _row(experiment_id=f"a{seed}", attack="badnets", defense="none", defense_kind="none", seed=seed,
             clean_acc=0.9, clean_acc_before=0.9, asr=0.95, asr_before=0.95) for seed in range(3)
    ], columns=list(COLUMNS)))
    board = _section(write_report(rows, tmp_path / "r.html").read_text(), "leaderboard")
    assert "No successful experiments on backdoored models" not in board
    assert "3 successful experiments on backdoored models, but no defense in them changed a model" in board


def test_a_detector_that_changes_no_model_is_not_ranked_by_der(tmp_path):
    """Issue 27: STRIP (DER 0.500 by construction: a filter leaves the model as it is) ranked first while detecting
    nothing, above a repair that really lowered the ASR at some cost in accuracy."""
    rows = []
    for seed in range(2):
        rows.append(_row(experiment_id=f"s{seed}", attack="badnets", defense="strip", defense_kind="input_detection",
                         seed=seed, clean_acc=0.9, clean_acc_before=0.9, asr=0.95, asr_before=0.95, der=0.5,
                         det_tpr=0.0, det_fpr=0.01, det_auroc=0.5))
        rows.append(_row(experiment_id=f"f{seed}", attack="badnets", defense="ft", defense_kind="model_repair",
                         seed=seed, clean_acc=0.7, clean_acc_before=0.9, asr=0.85, asr_before=0.95,
                         der=0.45 + seed / 100))
    rows = _through_sqlite(tmp_path, pd.DataFrame(rows, columns=list(COLUMNS)))
    board = leaderboard(rows)
    assert board["defense"].tolist() == ["ft", "strip"] and board["ranked"].tolist() == [True, False]
    html = write_report(rows, tmp_path / "r.html").read_text()
    section = _section(html, "leaderboard")
    assert '<tr class="rank1"><td class="num" data-value="1.0">1</td><td>ft</td>' in section.replace(
        'data-value="1"', 'data-value="1.0"')
    assert "<td>strip</td>" not in section and "Not ranked by DER: strip." in section
    assert "<td>strip</td>" in _section(html, "detection")  # judged on its own scale


def test_detection_scores_the_payload_and_falls_back_to_det_tpr_in_rows_stored_before_it(tmp_path):
    """Issue 24: a cleanser that flags Adaptive-Blend's cover samples (a trigger under the true label) has not
    detected the backdoor: the detection tables read det_payload_* (Qi et al.'s elimination and sacrifice rates),
    and det_* only in rows stored before those columns existed."""
    common = dict(defense="ac", defense_kind="training_data_detection", clean_acc=0.9, clean_acc_before=0.9,
                  asr=0.5, asr_before=0.9, der=0.7)
    rows = _through_sqlite(tmp_path, pd.DataFrame([
        _row(experiment_id="adaptive", attack="adaptive_blend", det_tpr=0.8, det_fpr=0.1, det_auroc=0.9,
             det_payload_tpr=0.3, det_payload_fpr=0.15, det_payload_auroc=0.6, **common),
        _row(experiment_id="old", attack="badnets", det_tpr=0.95, det_fpr=0.05, det_auroc=0.97, **common),
    ], columns=list(COLUMNS)))
    html = write_report(rows, tmp_path / "r.html").read_text()
    detection = _section(html, "detection")
    for value in ("0.300", "0.150", "0.600", "0.950", "0.050", "0.970"):
        assert f">{value}</td>" in detection, value
    for value in ("0.800", "0.100", "0.900"):  # the adaptive row's rates counting its covers as detected
        assert f">{value}</td>" not in detection, value
    assert "det_payload_tpr" in detection  # the note names the columns
    naive = naive_detection_table(rows, ["attack"]).set_index("attack")
    assert naive.loc["adaptive_blend", "naive_tpr"] == pytest.approx(0.3)
    assert naive.loc["badnets", "naive_tpr"] == pytest.approx(0.95)


def test_detection_is_split_by_precision_and_precisions_keep_their_natural_order(tmp_path):
    """Issue 27: AUROC 0.855 at fp32 and 0.113 at int8 were shown as 0.484; precisions sorted alphabetically."""
    rows = []
    for precision, auroc in (("int4-sim", 0.3), ("int8-dynamic", 0.113), ("fp32", 0.855)):
        rows.append(_row(experiment_id=f"ac-{precision}", attack="badnets", defense="ac",
                         defense_kind="training_data_detection", precision=precision, clean_acc=0.9,
                         clean_acc_before=0.9, asr=0.1, asr_before=0.9, der=0.9, det_tpr=0.8, det_fpr=0.1,
                         det_auroc=auroc))
        rows.append(_row(experiment_id=f"ac-none-{precision}", attack="none", defense="ac",
                         defense_kind="training_data_detection", precision=precision, clean_acc=0.9,
                         clean_acc_before=0.9, det_fpr=0.05))
    rows = _through_sqlite(tmp_path, pd.DataFrame(rows, columns=list(COLUMNS)))
    html = write_report(rows, tmp_path / "r.html").read_text()
    detection = _section(html, "detection")
    assert "0.484" not in detection and "0.423" not in detection  # no mean across precisions
    for auroc in ("0.855", "0.113", "0.300"):
        assert f">{auroc}</td>" in detection
    assert detection.index("fp32") < detection.index("int8-dynamic") < detection.index("int4-sim")
    precision = _section(html, "precision")
    table = precision[precision.index("<table"):]
    assert table.index(">fp32<") < table.index(">int8-dynamic<") < table.index(">int4-sim<")
    board = _section(html, "leaderboard")
    assert board.index(">fp32<") < board.index(">int8-dynamic<") < board.index(">int4-sim<")  # DER per precision
