"""`bench leaderboard`: from a real MLflow store to HTML / Markdown / LaTeX, checked in headless chromium."""

import json
import math
import re
import shutil
import struct

import pandas as pd
import pytest

from benchbench.analysis import Summary
from benchbench.cli import main
from benchbench.leaderboard import collect, load_reported, render_html, sections
from benchbench.leaderboard.render import PAPERS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """Two smoke `bench run`s into one sqlite store: lora+mal on seeds 0,1, then lora seed 0 again (--rerun)."""
    tmp = tmp_path_factory.mktemp("lb")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    common = ["--tasks", "synthetic", "--preset", "smoke", "--tracking-uri", uri, "--no-progress"]
    assert main(["run", "--methods", "lora,mal", "--seeds", "0,1", "--output", str(tmp / "run1"), *common]) == 0
    assert main(["run", "--methods", "lora", "--seeds", "0", "--rerun", "--output", str(tmp / "run2"), *common]) == 0
    board = tmp / "board"
    assert main(["leaderboard", "--tracking-uri", uri, "--output", str(board), "--resamples", "200"]) == 0
    return {"tmp": tmp, "uri": uri, "board": board}


def test_reported_rows_are_the_papers_numbers():
    rep = load_reported()
    assert set(rep["source"]) == set(PAPERS)
    row = rep[(rep.task == "iemocap") & (rep.backbone == "qwen2-audio-7b") & (rep.method == "mal")].iloc[0]
    assert (row.wa, row.ua, row.wf1) == pytest.approx((0.8366, 0.8420, 0.8367))
    meld = rep[(rep.task == "meld") & (rep.backbone == "ultravox-v0.4") & (rep.method == "lora")].iloc[0]
    assert math.isnan(meld.wa) and meld.macro_f1 == pytest.approx(0.3197)
    dpm = rep[(rep.method == "dpm") & rep.note.str.contains(r"\*", regex=True)].iloc[0]
    assert dpm.wa == pytest.approx(0.7938) and dpm.table == "Table 1"
    vals = rep[["wa", "ua", "wf1", "macro_f1"]].stack().dropna()
    assert vals.between(0, 1).all() and len(rep) == 45
    # Titans-as-a-Layer Sec. 3.2's injection ablation (one branch on the frozen LALM, no LoRA) and DPM
    # Table 3 (one-pass inference at a 4k and a 32k window), each as its table prints it
    ablation = rep[rep.table == "Sec. 3.2"].set_index("method")["wf1"]
    assert ablation.to_dict() == pytest.approx({"zero_shot": 0.4452, "mac": 0.4990, "mag": 0.5032, "mal": 0.5748})
    window = rep[rep.table == "Table 3"].set_index("backbone")[["wa", "ua", "wf1"]]
    assert tuple(window.loc["llama2-7b-32k+cosyvoice2"]) == pytest.approx((0.7285, 0.7334, 0.7558))
    assert tuple(window.loc["llama2-7b-4k+cosyvoice2"]) == pytest.approx((0.6959, 0.7207, 0.6957))


def _comparison(method, wa_ci, ua_ci, p_holm):
    boot = {m: {"diff": sum(ci) / 2, "ci_low": ci[0], "ci_high": ci[1]}
            for m, ci in {"wa": wa_ci, "ua": ua_ci, "wf1": (-0.01, 0.01), "macro_f1": (-0.01, 0.01)}.items()}
    return {"task": "t", "backbone": "b", "method": method, "reference": "lora", "bootstrap": boot,
            "dialogues": {"wilcoxon_p": p_holm / 2, "wilcoxon_p_holm": p_holm}}


def _cell(method, wa):
    iv = {"mean": wa, "sd": 0.01, "n": 3, "ci_low": wa - 0.02, "ci_high": wa + 0.02}
    return {"method": method, "task": "t", "backbone": "b", "n": 3, "wa": iv, "ua": iv, "wf1": iv, "macro_f1": iv,
            "f1_x": iv, "fit_seconds": {"mean": 1.0}, "eval_ms_per_utterance": {"mean": 2.0},
            "trained_parameters": {"mean": 10.0}}


def test_marks_need_both_the_bootstrap_interval_and_the_holm_corrected_test():
    summary = Summary.from_dict({
        "cells": [_cell("lora", 0.5), _cell("better", 0.6), _cell("worse", 0.4), _cell("noisy", 0.58)],
        "tasks": {"t": {"labels": ["x"]}},
        "comparisons": [_comparison("better", (0.02, 0.15), (-0.01, 0.08), 0.01),
                        _comparison("worse", (-0.2, -0.03), (-0.2, -0.03), 0.002),
                        _comparison("noisy", (0.01, 0.15), (0.01, 0.15), 0.08)]})
    (sec,) = sections(summary)
    rows = {r.method: r for r in sec.rows}
    assert [r.method for r in sec.rows] == ["better", "noisy", "lora", "worse"]  # sorted by WA
    assert rows["better"].marks == {"wa": "▲"}            # UA's interval contains 0: no mark
    assert rows["worse"].marks == {"wa": "▼", "ua": "▼"}
    assert rows["noisy"].marks == {} and rows["lora"].marks == {}  # Holm p >= 0.05: no mark at all
    page = render_html(summary)
    assert page.count('class="up"') == 2 and page.count('class="down"') == 3  # + one each in the legend


def test_bench_leaderboard_reads_mlflow_and_writes_every_format(logged):
    board, tmp = logged["board"], logged["tmp"]
    for name in ("leaderboard.html", "leaderboard.md", "leaderboard.tex", "leaderboard.json"):
        assert (board / name).stat().st_size > 300, name
    data = json.loads((board / "leaderboard.json").read_text())
    cells = {c["method"]: c for c in data["summary"]["cells"]}
    assert set(cells) == {"lora", "mal"} and cells["mal"]["n"] == 2
    assert {c["method"] for c in data["summary"]["comparisons"]} == {"mal"}
    assert len(data["sources"]) == 2
    # the numbers are the logged cells: mal from run 1, lora's seed 0 replaced by run 2's re-run
    r1, r2 = pd.read_csv(tmp / "run1" / "results.csv"), pd.read_csv(tmp / "run2" / "results.csv")
    assert cells["mal"]["wa"]["mean"] == pytest.approx(r1[r1.method == "mal"]["wa"].mean())
    lora = pd.concat([r2, r1[(r1.method == "lora") & (r1.seed == 1)]])
    assert cells["lora"]["wa"]["mean"] == pytest.approx(lora["wa"].mean())
    got = collect(logged["uri"])
    lora_s0 = got.results[(got.results.method == "lora") & (got.results.seed == 0)]
    assert lora_s0["mlflow_run_id"].tolist() == r2["mlflow_run_id"].tolist()
    assert len(got.predictions) == r1["n_test"].sum()
    assert got.task_info["synthetic"].reference.context_free > 0.25

    md = (board / "leaderboard.md").read_text()
    # a section for what ran; the papers' rows for pairs nothing ran on in one compact table
    assert "### synthetic · tiny-qwen2-audio (smoke preset)" in md and "### iemocap · qwen2-audio-7b" not in md
    assert "| iemocap | qwen2-audio-7b | mal (+ Titans+LoRA) | 83.66 | 84.20 | 83.67 | Titans-as-a-Layer Table 1 |" in md
    assert "| mal | " in md and "context_free" in md  # Phase 2 in every cell (no gate): nothing to annotate
    tex = (board / "leaderboard.tex").read_text()
    assert tex.count(r"\begin{tabular}") == md.count("### ") - 1  # the compact table is not a section
    page = (board / "leaderboard.html").read_text()
    assert page.count("<svg") >= 3 and "Titans-as-a-Layer" in page
    assert "training seconds per cell" in page and "inference ms per utterance" in page  # cost vs accuracy
    assert "<details><summary>Per-class F1 and costs</summary>" in page
    assert "2 (2 x 1)" in page  # n as seeds x folds
    # self-contained: nothing is fetched (no external scripts, styles, images or fonts)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "@import" not in page and "url(http" not in page


def test_bench_leaderboard_names_a_missing_experiment(logged, capsys):
    rc = main(["leaderboard", "--tracking-uri", logged["uri"], "--experiment", "nope", "--output",
               str(logged["tmp"] / "x")])
    assert rc == 2 and "no MLflow experiment named 'nope'" in capsys.readouterr().err


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_leaderboard_page_in_headless_chromium(logged):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    page_path = (logged["board"] / "leaderboard.html").resolve()
    shot = logged["board"] / "leaderboard.png"
    errors: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(page_path.as_uri())
        table = page.locator("#s0 table.main")
        # the main table fits 1400 px: no horizontal overflow of the table, its section or the page
        widths = page.evaluate("""() => { const t = document.querySelector('#s0 table.main');
            return {table: t.scrollWidth, box: t.parentElement.clientWidth,
                    page: document.documentElement.scrollWidth, view: window.innerWidth}; }""")
        assert widths["table"] <= widths["box"] and widths["page"] <= widths["view"], widths
        heads = table.locator("th").all_inner_texts()
        assert heads[:2] == ["method", "n (seeds x folds)"] and heads[-1].startswith("gap closed")
        assert not any(h.startswith("F1 ") or "fit s" in h for h in heads)  # per-class F1 and costs: the second table
        wa_col = table.locator("th").all_inner_texts().index("WA")

        def column(i):
            return [c.get_attribute("data-v") for c in table.locator(f"tbody tr td:nth-child({i + 1})").all()]

        table.locator("th").nth(wa_col).click()
        desc = [float(v) for v in column(wa_col)]
        assert desc == sorted(desc, reverse=True)
        assert table.locator("th").nth(wa_col).get_attribute("aria-sort") == "descending"
        table.locator("th").nth(0).click()  # by method name
        names = column(0)
        assert names == sorted(names, reverse=True)
        table.locator("th").nth(0).click()
        assert column(0) == sorted(names)
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", png[16:24])
    assert width == 1400 and height > 1000  # the full page: tables, plots and reported sections


def test_an_ablation_gets_its_own_row_labelled_with_what_differs(tmp_path):
    """The README's ablation after a default run on one store: two mal rows, labelled apart, each with
    its own numbers (the ablation's trained parameters are not the preset's), in results.csv, MLflow,
    the summary and the leaderboard."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["--tasks", "synthetic", "--preset", "smoke", "--seeds", "0", "--tracking-uri", uri, "--no-progress"]
    assert main(["run", "--methods", "lora,mal", "--output", str(tmp_path / "a"), *common]) == 0
    assert main(["run", "--methods", "mal", "--set", "mal.layers=0", "--set", "mal.d_m=16",
                 "--output", str(tmp_path / "b"), *common]) == 0
    a, b = pd.read_csv(tmp_path / "a" / "results.csv"), pd.read_csv(tmp_path / "b" / "results.csv")
    assert list(b["method"]) == ["mal{layers=0}"]  # d_m=16 is the smoke preset's own value: not a departure
    assert b["config_id"][0] != a.set_index("method").loc["mal", "config_id"]
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert [c["method"] for c in summary["cells"]] == ["mal{layers=0}"]
    got = collect(uri)
    rows = got.results.set_index("method")
    assert sorted(rows.index) == ["lora", "mal", "mal{layers=0}"] and not got.notes
    assert rows.loc["mal", "trained_parameters"] > rows.loc["mal{layers=0}", "trained_parameters"]
    assert rows.loc["mal", "wa"] == pytest.approx(a.set_index("method").loc["mal", "wa"])
    assert main(["leaderboard", "--tracking-uri", uri, "--output", str(tmp_path / "lb"), "--resamples", "100"]) == 0
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert re.search(r"^\| mal[ (].*\| 79,848 \|", md, re.M) and re.search(r"^\| mal\{layers=0\}[ (].*\| 72,692 \|", md, re.M)
    data = json.loads((tmp_path / "lb" / "leaderboard.json").read_text())
    assert {c["method"] for c in data["summary"]["comparisons"]} == {"mal", "mal{layers=0}"}
    assert r"mal\{layers=0\}" in (tmp_path / "lb" / "leaderboard.tex").read_text()


def test_a_label_that_stood_for_another_configuration_is_told_apart():
    from benchbench.leaderboard.collect import _split_configurations

    rows = pd.DataFrame({"task": "synthetic", "backbone": "tiny", "preset": "default", "method": ["mal"] * 3 + ["lora"],
                         "config_id": ["aaaaaa111111", "bbbbbb222222", "bbbbbb222222", "cccccc"],
                         "start_time": pd.to_datetime(["2026-01-01", "2026-02-01", "2026-02-02", "2026-01-01"])})
    out, notes = _split_configurations(rows.copy())
    assert list(out["method"]) == ["mal@aaaaaa", "mal", "mal", "lora"]  # the newest configuration keeps the label
    assert len(notes) == 1 and "mal@aaaaaa" in notes[0] and "aaaaaa111111" in notes[0]
