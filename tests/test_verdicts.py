"""Verdicts that survive review: the history-free control, the capacity control, the phase gate's
audit, intervals over the independent units, the declared Holm family and the verdict rule.

The statistics are tested on constructed predictions whose answers are known; the controls on real
cells of the tiny Qwen2-Audio backbone (a stateless method, a planted history-only method, mal).
"""

from __future__ import annotations

from itertools import product

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from benchbench.analysis import decompose, phase_gate_audit, verdict
from benchbench.cells import Cell, compute_cell, history_free_inputs
from benchbench.method import METHODS
from benchbench.stats import compare_all, history_slope, paired_difference

LABELS = ["a", "b"]


def _frame(correct_a, correct_b, folds=(0, 1, 2, 3, 4), seeds=(0, 1, 2), dialogues=4, turns=5) -> pd.DataFrame:
    """Rows of two methods' predictions on the same utterances: ``correct_a(fold, seed, dialogue, turn)``
    says whether method a is right (likewise b); the label is always "a"."""
    rows = []
    for f, s, d, t in product(folds, seeds, range(dialogues), range(turns)):
        rows.append({"fold": f, "seed": s, "dialogue_id": f"f{f}d{d}", "utterance_id": f"f{f}d{d}t{t}", "label": "a",
                     "speaker_history": t // 2,
                     "prediction": "a" if correct_a(f, s, d, t) else "b",
                     "prediction_ref": "a" if correct_b(f, s, d, t) else "b"})
    return pd.DataFrame(rows)


def test_the_difference_is_the_mean_over_cells_so_the_columns_subtract():
    rng = np.random.default_rng(0)
    table_a, table_b = rng.random((5, 3, 4, 5)) < 0.7, rng.random((5, 3, 4, 5)) < 0.5
    j = _frame(lambda f, s, d, t: table_a[f, s, d, t], lambda f, s, d, t: table_b[f, s, d, t])
    res = paired_difference(j, "prediction", "prediction_ref", LABELS, n_resamples=500)
    cell_wa = lambda col: (j[col] == j["label"]).groupby([j["fold"], j["seed"]]).mean()  # noqa: E731
    assert res["wa"]["diff"] == pytest.approx((cell_wa("prediction") - cell_wa("prediction_ref")).mean(), abs=1e-12)
    assert res["wa"]["ci_low"] < res["wa"]["diff"] < res["wa"]["ci_high"]
    assert res["wa"]["n_dialogues"] == 20 and res["wa"]["n_folds"] == 5
    # the fold-level interval: Student t over the five folds' seed-averaged differences
    per_fold = (cell_wa("prediction") - cell_wa("prediction_ref")).groupby(level=0).mean()
    lo, hi = stats.t.interval(0.95, 4, loc=per_fold.mean(), scale=per_fold.std(ddof=1) / np.sqrt(5))
    assert (res["wa"]["fold_ci_low"], res["wa"]["fold_ci_high"]) == pytest.approx((lo, hi))
    # total = dialogue + capacity, exactly, for every metric (each cell's differences telescope)
    j["prediction_nohist"] = np.where(rng.random(len(j)) < 0.6, "a", "b")
    total = res
    dialogue = paired_difference(j, "prediction", "prediction_nohist", LABELS, n_resamples=100)
    capacity = paired_difference(j, "prediction_nohist", "prediction_ref", LABELS, n_resamples=100)
    for m in ("wa", "ua", "wf1", "macro_f1"):
        assert total[m]["diff"] == pytest.approx(dialogue[m]["diff"] + capacity[m]["diff"], abs=1e-12)


def test_seeds_are_not_independent_units():
    """The same dialogues under three identical seeds give the interval of one seed: a dialogue is one
    unit, whatever the number of seeds (the published gap interval resampled them as three)."""
    rng = np.random.default_rng(1)
    table = rng.random((5, 4, 5)) < 0.7
    one = _frame(lambda f, s, d, t: table[f, d, t], lambda f, s, d, t: False, seeds=(0,))
    three = _frame(lambda f, s, d, t: table[f, d, t], lambda f, s, d, t: False, seeds=(0, 1, 2))
    a = paired_difference(one, "prediction", "prediction_ref", LABELS, n_resamples=400)["wa"]
    b = paired_difference(three, "prediction", "prediction_ref", LABELS, n_resamples=400)["wa"]
    assert (a["diff"], a["ci_low"], a["ci_high"]) == pytest.approx((b["diff"], b["ci_low"], b["ci_high"]))


def test_a_constant_difference_has_a_point_interval_and_a_flat_history_slope():
    j = _frame(lambda *k: True, lambda *k: False)
    res = paired_difference(j, "prediction", "prediction_ref", LABELS, n_resamples=200)["wa"]
    assert (res["diff"], res["ci_low"], res["ci_high"]) == (1.0, 1.0, 1.0)
    j = j.assign(correct=1.0, correct_ref=0.0)
    assert history_slope(j, n_resamples=200)["slope"] == pytest.approx(0.0, abs=1e-12)
    # a method that is right only from the speaker's second earlier utterance on rises along the history
    rising = _frame(lambda f, s, d, t: t // 2 >= 1, lambda *k: False)
    rising = rising.assign(correct=(rising["prediction"] == "a").astype(float), correct_ref=0.0)
    slope = history_slope(rising, n_resamples=200)
    assert slope["slope"] > 0.2 and slope["ci_low"] > 0


def _preds_of(methods: dict, task="t", backbone="b") -> pd.DataFrame:
    rows = []
    for m, correct in methods.items():
        f = _frame(correct, lambda *k: True)
        rows.append(f.assign(method=m, task=task, backbone=backbone, correct=(f["prediction"] == "a").astype(int))
                    .drop(columns=["prediction_ref"]))
    return pd.concat(rows, ignore_index=True)


def test_the_holm_family_is_declared_per_task_and_backbone():
    """One comparison's adjusted p does not change when another task or backbone joins the run."""
    rng = np.random.default_rng(2)
    tables = {m: rng.random((5, 3, 4, 5)) < p for m, p in (("lora", 0.6), ("x", 0.75), ("y", 0.62))}
    methods = {m: (lambda f, s, d, t, tb=tb: tb[f, s, d, t]) for m, tb in tables.items()}
    alone = _preds_of(methods)
    other = _preds_of({"lora": lambda *k: True, "z": lambda *k: False}, task="u")
    one = {c["method"]: c for c in compare_all(alone, {"t": LABELS}, n_resamples=100)}
    both = {c["method"]: c for c in compare_all(pd.concat([alone, other]), {"t": LABELS, "u": LABELS},
                                                n_resamples=100) if c["task"] == "t"}
    for m in ("x", "y"):
        assert one[m]["dialogues"]["wilcoxon_p_holm"] == both[m]["dialogues"]["wilcoxon_p_holm"]
        assert one[m]["family"] == {"name": "each method against lora on t · b", "size": 2}
    raw = sorted(one[m]["dialogues"]["wilcoxon_p"] for m in ("x", "y"))
    assert min(one[m]["dialogues"]["wilcoxon_p_holm"] for m in ("x", "y")) == pytest.approx(min(1, 2 * raw[0]))


def test_the_verdict_rule():
    iv = lambda lo, hi: {"diff": (lo + hi) / 2, "ci_low": lo, "ci_high": hi}  # noqa: E731
    assert verdict(iv(-0.05, -0.01), iv(0.01, 0.02), iv(-0.1, -0.05)) == "hurts"
    assert verdict(iv(0.01, 0.09), iv(0.01, 0.05), iv(-0.02, 0.03)) == "gains through the dialogue"
    assert verdict(iv(0.01, 0.09), iv(-0.01, 0.03), iv(0.01, 0.06)) == "gains through capacity only"
    assert verdict(iv(0.01, 0.09), iv(-0.01, 0.05), iv(-0.01, 0.06)) == "gains, source unresolved"
    assert verdict(iv(0.01, 0.09), None, None) == "gains, source unresolved"
    assert verdict(iv(-0.02, 0.04), iv(-0.01, 0.03), iv(-0.02, 0.02)) == "no resolvable effect"
    # the dialogue helps the method's own history-free self, which trails lora: no gain over lora
    assert verdict(iv(-0.08, 0.0), iv(0.05, 0.13), iv(-0.18, -0.08)) == "no resolvable effect"


def test_decompose_splits_a_capacity_gain_from_a_dialogue_gain():
    """Method "cap" is right everywhere, alone or in its dialogue (capacity only); "dlg" is right from
    the second turn on, and its history-free self is lora (the dialogue only)."""
    lora = lambda f, s, d, t: t == 0  # noqa: E731
    preds = _preds_of({"lora": lora, "cap": lambda *k: True, "dlg": lambda f, s, d, t: True,
                       "dlg{history=false}": lora})
    nohist = {"lora": lora, "cap": lambda *k: True, "dlg": lora, "dlg{history=false}": lora}
    preds["prediction_nohist"] = [("a" if nohist[m](f, s, int(d.split("d")[1]), int(u.rsplit("t", 1)[1])) else "b")
                                  for m, f, s, d, u in preds[["method", "fold", "seed", "dialogue_id",
                                                              "utterance_id"]].itertuples(index=False)]
    comps = compare_all(preds, {"t": LABELS}, n_resamples=100)
    out = {d["method"]: d for d in decompose(preds, {"t": LABELS}, comps, n_resamples=100)}
    assert out["cap"]["verdict"] == "gains through capacity only" and out["cap"]["dialogue"]["wa"]["diff"] == 0
    assert out["dlg"]["verdict"] == "gains through the dialogue" and out["dlg"]["capacity"]["wa"]["diff"] == 0
    assert out["dlg"]["total"]["wa"]["diff"] == pytest.approx(0.8)
    assert out["dlg"]["family"]["size"] == 3 and out["dlg"]["holm_p"] is not None
    # against the same memory trained without history (its capacity control), the history adds 0.8
    assert out["dlg"]["trained_control"]["control"] == "dlg{history=false}"
    assert out["dlg"]["trained_control"]["difference"]["wa"]["diff"] == pytest.approx(0.8)
    assert out["cap"]["trained_control"] is None


def test_the_phase_gate_audit_counts_hits_against_test():
    """Five cells: Phase 2 better on test in folds 0-2, worse in 3-4; the gate (dev) keeps Phase 2 in
    folds 0, 3 and 4: right in fold 0 only of the five decisive cells."""
    better2 = {0: True, 1: True, 2: True, 3: False, 4: False}
    preds = _preds_of({"lora": lambda f, s, d, t: t < 2, "m": lambda f, s, d, t: t < 2})
    preds = preds[preds["seed"] == 0].copy()
    preds["cell_key"] = preds["method"] + preds["fold"].astype(str)
    is_m = preds["method"] == "m"
    turn = preds["utterance_id"].str.rsplit("t", n=1).str[1].astype(int)
    preds.loc[is_m, "prediction_phase1"] = np.where(turn[is_m] < 2, "a", "b")
    preds.loc[is_m, "prediction_phase2"] = [("a" if (t < 3 if better2[f] else t < 1) else "b")
                                            for f, t in zip(preds.loc[is_m, "fold"], turn[is_m])]
    rows = pd.DataFrame([{"cell_key": f"m{f}", "dev_score_phase1": 0.5, "dev_score_phase2": 0.6 if f in (0, 3, 4)
                          else 0.4} for f in range(5)])
    (g,) = phase_gate_audit(preds, rows, {"t": LABELS}, n_resamples=100)
    assert (g["kept"], g["n"], g["hits"], g["decisive"]) == (3, 5, 1, 5)
    assert g["always_phase2"]["diff"] == pytest.approx((3 * 0.2 - 2 * 0.2) / 5)
    assert g["gated"]["diff"] == pytest.approx((0.2 - 2 * 0.2) / 5)
    assert g["p_above_chance"] == pytest.approx(stats.binomtest(1, 5, 0.5, alternative="greater").pvalue)


# ---------------------------------------------------------------------------- the controls in real cells
def _cell(method, task, backbone, overrides=None):
    fold, manifest = task.folds()[0], task.manifest()
    return Cell(method, task, fold, 0, backbone, backbone.name, "smoke", "smoke", overrides or {}, manifest)


def test_the_control_of_a_stateless_method_is_the_method(backbone, tiny_task):
    record = compute_cell(_cell("lora", tiny_task, backbone))
    p = record.predictions
    assert record.row["history_free_control"] and (p["prediction_nohist"] == p["prediction"]).all()
    assert record.row["wa_nohist"] == record.row["wa"]


def test_the_control_of_a_history_only_method_is_lora(backbone, tiny_task):
    """A planted method that moves lora's posterior towards the class after the previous utterance's
    prediction (an inertia rule read from its history only): in its dialogue it departs from lora,
    and its history-free control is lora, prediction for prediction."""
    from methods.lora import LoRAMethod

    class PreviousTurn(LoRAMethod):
        name = "planted_previous_turn"
        uses_context = True

        def predict_dialogues(self, dialogues):
            out = []
            for p in super().predict_dialogues(dialogues):
                q = p.copy()
                q[1:] = 0.2 * p[1:] + 0.8 * np.eye(p.shape[1])[(p[:-1].argmax(-1) + 1) % p.shape[1]]
                out.append(q)
            return out

    METHODS.register(PreviousTurn.name, PreviousTurn)
    try:
        mine = compute_cell(_cell(PreviousTurn.name, tiny_task, backbone))
        lora = compute_cell(_cell("lora", tiny_task, backbone))
    finally:
        METHODS._entries.pop(PreviousTurn.name, None)
        METHODS._origins.pop(PreviousTurn.name, None)
    assert mine.ok and lora.ok
    assert (mine.predictions["prediction_nohist"].to_numpy() == lora.predictions["prediction"].to_numpy()).all()
    assert (mine.predictions["prediction"] != lora.predictions["prediction"]).any()  # the planted history acts


def test_history_free_inputs_give_every_utterance_its_own_dialogue(tiny_task):
    test = tiny_task.folds()[0].test
    flat = history_free_inputs(test)
    assert [len(d) for d in flat] == [1] * sum(len(d) for d in test)
    assert [d[0] for d in flat] == [u for d in test for u in d.inputs()]


def test_a_two_stage_cell_saves_both_phases_and_the_capacity_control_ignores_history(backbone, tiny_task):
    record = compute_cell(_cell("mal", tiny_task, backbone))
    p, row = record.predictions, record.row
    assert row["selected_phase"] == 2 and row["phase_gate"] is False  # the papers' protocol by default
    assert (p["prediction_phase2"] == p["prediction"]).all()
    assert {"dev_score_phase1", "dev_score_phase2", "wa_phase1", "wa_phase2"} <= set(row)
    lora = compute_cell(_cell("lora", tiny_task, backbone))
    assert (p["prediction_phase1"].to_numpy() == lora.predictions["prediction"].to_numpy()).all()



@pytest.mark.parametrize("method", ["mal", "ttt", "rmt"])
def test_the_capacity_control_predicts_every_utterance_alone(method, backbone, tiny_task):
    """history=false: a fresh memory for every utterance, in training and evaluation, so a dialogue
    predicts as its utterances alone, batched or streamed, with the memory switched on."""
    cls = METHODS.get(method)
    m = cls(backbone, tiny_task.labels, cls.make_config("smoke", {"history": False}), seed=0)
    m.fit(tiny_task.folds()[0].train, tiny_task.folds()[0].dev)
    m.activate_context(0)
    test = tiny_task.folds()[0].test
    whole = np.concatenate(m.predict_dialogues([d.inputs() for d in test]))
    alone = np.concatenate(m.predict_dialogues(history_free_inputs(test)))
    stepped = []
    for d in test:
        m.reset()
        stepped += [m.step(u) for u in d.inputs()]
    np.testing.assert_allclose(whole, alone, atol=1e-5)
    np.testing.assert_allclose(np.stack(stepped), alone, atol=1e-5)
    assert cls.label(m.config, "smoke").endswith("{history=false}")


def test_label_history_strength_is_chosen_on_the_other_folds():
    """Fold 1 holds the same dialogues as fold 0 under a transition matrix that points the wrong way:
    its own best strength is 0, fold 0's is 0.5. Each fold takes the other's choice, so neither is
    chosen on the labels it is scored on."""
    from benchbench.analysis import TaskSummary, label_history_references
    from tests.test_hmm import _ceiling_fixture

    preds, tasks = _ceiling_fixture()
    both = pd.concat([preds, preds.assign(fold=1)], ignore_index=True)
    A = tasks["toy"].transitions["0"]
    info = TaskSummary(["a", "b"], transitions={"0": A, "1": {"A": [[0.2, 0.8], [0.7, 0.3]], "prior": A["prior"]}})
    alone = {f: label_history_references(both[both["fold"] == f], {"toy": info})[0][0] for f in (0, 1)}
    assert (alone[0]["strength"], alone[1]["strength"]) == (0.5, 0.0)  # each fold's own best, on itself
    assert alone[0]["strength_chosen_on"] == "its own fold, the run's only one"
    (ref,), rows = label_history_references(both, {"toy": info})
    assert ref["strength_by_fold"] == {"0": 0.0, "1": 0.5} and ref["strength"] is None
    assert ref["strength_chosen_on"] == "the other folds"
    target = rows[("toy", "bb")]
    fold0 = target[target["fold"] == 0]["target_correct"]
    assert not fold0.any()  # strength 0 (chosen on fold 1) is lora itself, wrong everywhere on fold 0
    assert ref["wa"] == pytest.approx(target["target_correct"].mean())


def test_the_published_verdicts_table_subtracts():
    """In the committed main job, every method's WA minus lora's WA is its total difference, and the
    total is the dialogue part plus the capacity part (the columns subtract, to the rounding)."""
    import re

    from benchbench.tools.publish import ROOT, CommittedRun, view_verdicts

    run = CommittedRun(ROOT / "results" / "main-job-v3")
    rows = [line.split(" | ") for line in view_verdicts(run).splitlines() if line.startswith("| `")]
    num = lambda text: float(re.match(r"[+-]?[\d.]+", text.strip()).group(0))  # noqa: E731
    lora = next(num(r[1]) for r in rows if r[0] == "| `lora`")
    checked = 0
    for r in rows:
        if r[0] == "| `lora`":
            continue
        wa, total, dialogue, capacity = (num(x) for x in r[1:5])
        assert abs(wa - lora - total) <= 0.011 and abs(dialogue + capacity - total) <= 0.011, r
        checked += 1
    assert checked == 3 and "family: each method against lora on synthetic" in view_verdicts(run)
