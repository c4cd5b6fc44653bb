"""Analysis: from finished cells to a typed :class:`Summary` (the contract of the CLI, the leaderboard
and ``summary.json``).

Input: one row per cell (``results.csv`` columns: method, task, backbone, seed, fold, status,
metrics as fractions, costs, ``n_test``, ``uses_context``), every scored test utterance's prediction
(``predictions.csv`` rows) and per task a :class:`TaskSummary`. Output: per method x task x backbone
the mean / sd / 95% Student-t interval / n of every metric and cost over seeds x folds; paired
comparisons against a reference method (:func:`benchbench.stats.compare_all`: dialogue-cluster
bootstrap, Wilcoxon over dialogues with Holm, McNemar, tests over cells); accuracy by the speaker's
history and by position in the dialogue; the leakage check of context-free methods against the
task's context-free ceiling. Nothing here trains or predicts: the same functions serve a fresh run
(:mod:`benchbench.harness`), a run folder (``bench compare``) and the MLflow store (``bench
leaderboard``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from .metrics import METRICS
from .stats import compare_all, interval, paired_rows
from .task import TaskReference

COST_COLUMNS = ("fit_seconds", "eval_ms_per_utterance", "trained_parameters", "peak_rss_mb", "peak_cuda_mb",
                "test_time_update_ms_per_utterance", "test_time_updates_per_utterance", "test_time_issues")
"""Cost columns of ``results.csv`` summarised per method (seconds, milliseconds, counts, MiB)."""


# ---------------------------------------------------------------------------- the typed summary
@dataclass
class TaskSummary:
    """What the analysis needs to know of a task: its labels (class-index order), reference figures,
    data-manifest hash, notices (count mismatches, skipped files) and, per fold (``"0"``, ...), the
    speaker-transition statistics of its training dialogues (``{"A": [C][C], "prior": [C]}``,
    :func:`benchbench.inertia.speaker_transitions`) from which the ``label_history`` reference is
    computed."""

    labels: list[str]
    reference: TaskReference = field(default_factory=TaskReference)
    manifest_sha256: str | None = None
    notices: list[str] = field(default_factory=list)
    transitions: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**self.reference.to_dict(), "manifest_sha256": self.manifest_sha256, "labels": list(self.labels),
                "notices": list(self.notices), **({"transitions": self.transitions} if self.transitions else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "TaskSummary":
        ref = {k: v for k, v in d.items() if k not in ("labels", "manifest_sha256", "notices", "transitions")}
        return cls(list(d.get("labels") or []), TaskReference.from_dict(ref), d.get("manifest_sha256"),
                   list(d.get("notices") or []), dict(d.get("transitions") or {}))


@dataclass
class CellSummary:
    """One method x task x backbone over its seeds x folds.

    ``stats``: column -> ``{"mean", "sd", "n", "ci_low", "ci_high"}`` (:func:`benchbench.stats.interval`)
    for the metrics (``wa``, ``ua``, ``wf1``, ``macro_f1``, ``f1_<label>``: fractions, intervals
    clipped to [0, 1]) and the costs (:data:`COST_COLUMNS`). ``selection``: for two-stage methods,
    ``{"phase_2": cells whose dev selection kept a Phase-2 epoch, "n": cells}`` (empty otherwise).
    """

    method: str
    task: str
    backbone: str
    n: int
    seeds: list[int]
    folds: list[int]
    stats: dict[str, dict]
    selection: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"method": self.method, "task": self.task, "backbone": self.backbone, "n": self.n,
                "seeds": self.seeds, "folds": self.folds, **self.stats,
                **({"selection": self.selection} if self.selection else {})}

    @classmethod
    def from_dict(cls, d: dict) -> "CellSummary":
        head = ("method", "task", "backbone", "n", "seeds", "folds", "selection")
        return cls(d["method"], d["task"], d["backbone"], int(d["n"]), list(d.get("seeds", [])),
                   list(d.get("folds", [])), {k: v for k, v in d.items() if k not in head}, dict(d.get("selection") or {}))


@dataclass
class LeakageCheck:
    """One context-free cell tested against its task's context-free ceiling (:func:`leakage_checks`)."""

    method: str
    task: str
    seed: int
    fold: int
    wa: float
    ceiling: float
    p_value: float
    p_bonferroni: float = float("nan")
    leakage_suspected: bool = False


@dataclass
class Summary:
    """Everything a run (or a set of logged runs) says, typed; ``to_dict`` is ``summary.json``.

    ``comparisons``, ``by_speaker_history`` and ``by_turn`` hold the records of
    :func:`benchbench.stats.compare`, :func:`accuracy_by_speaker_history` and
    :func:`accuracy_by_turn` (their docstrings give the keys); ``context_references`` and
    ``gap_closed`` those of :func:`label_history_references` and :func:`gaps_closed` (``summary.json``
    repeats the first as ``context_ceilings``, a deprecated alias of version 0.2); ``decomposition``
    and ``phase_gate`` those of :func:`decompose` (each method's gain split into dialogue and
    capacity, with its verdict) and :func:`phase_gate_audit`; ``failed_cells``
    the failed rows of ``results.csv``; ``run`` where the run's files and MLflow records are (a
    fresh run only).
    """

    cells: list[CellSummary] = field(default_factory=list)
    tasks: dict[str, TaskSummary] = field(default_factory=dict)
    leakage: list[LeakageCheck] = field(default_factory=list)
    comparisons: list[dict] = field(default_factory=list)
    by_speaker_history: list[dict] = field(default_factory=list)
    by_turn: list[dict] = field(default_factory=list)
    failed_cells: list[dict] = field(default_factory=list)
    run: dict | None = None
    context_references: list[dict] = field(default_factory=list)
    gap_closed: list[dict] = field(default_factory=list)
    decomposition: list[dict] = field(default_factory=list)
    phase_gate: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = {"cells": [c.to_dict() for c in self.cells], "tasks": {t: s.to_dict() for t, s in self.tasks.items()},
               "checks": {"leakage": [asdict(c) for c in self.leakage]}, "comparisons": self.comparisons,
               "by_speaker_history": self.by_speaker_history, "by_turn": self.by_turn,
               "failed_cells": self.failed_cells, "context_references": self.context_references,
               "context_ceilings": self.context_references, "gap_closed": self.gap_closed,
               "decomposition": self.decomposition, "phase_gate": self.phase_gate}
        if self.run is not None:
            out["run"] = self.run
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Summary":
        """Read ``summary.json`` (``ValueError`` naming a missing top-level key)."""
        missing = {"cells", "tasks"} - set(d)
        if missing:
            raise ValueError(f"not a benchbench summary: missing {sorted(missing)}")
        return cls([CellSummary.from_dict(c) for c in d["cells"]],
                   {t: TaskSummary.from_dict(s) for t, s in d["tasks"].items()},
                   [LeakageCheck(**c) for c in d.get("checks", {}).get("leakage", [])],
                   d.get("comparisons", []), d.get("by_speaker_history", []), d.get("by_turn", []),
                   d.get("failed_cells", []), d.get("run"),
                   d.get("context_references", d.get("context_ceilings", [])), d.get("gap_closed", []),
                   d.get("decomposition", []), d.get("phase_gate", []))

    @classmethod
    def read(cls, path: str | Path) -> "Summary":
        """``summary.json`` from disk; ``ValueError`` naming the file when it is not a summary."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: {e}") from None

    def write(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=str))


# ---------------------------------------------------------------------------- by history and position
HISTORY_BINS = (0, 1, 2, 3)  # the last bin is "3 or more"


def history_bin(k: int) -> str:
    """``"0"``, ``"1"``, ``"2"`` or ``"3+"`` for a count of the speaker's earlier utterances."""
    return f"{HISTORY_BINS[-1]}+" if k >= HISTORY_BINS[-1] else str(int(k))


def accuracy_by_speaker_history(preds: pd.DataFrame) -> list[dict]:
    """WA per method/task/backbone by the number of the speaker's earlier utterances (0, 1, 2, 3+).

    Pooled over seeds and folds; records ``{"method", "task", "backbone", "wa": {bin: fraction},
    "n": {bin: count}}``. A context method's gain should grow with the history; an utterance-level
    method's accuracy should not depend on it.
    """
    if preds.empty or "speaker_history" not in preds:
        return []
    binned = preds.assign(history_bin=preds["speaker_history"].map(history_bin))
    out = []
    for (m, t, b), g in binned.groupby(["method", "task", "backbone"], sort=False):
        acc = g.groupby("history_bin", sort=False)["correct"].agg(["mean", "size"])
        acc = acc.loc[[k for k in map(history_bin, HISTORY_BINS) if k in acc.index]]
        out.append({"method": m, "task": t, "backbone": b,
                    "wa": {k: float(v) for k, v in acc["mean"].items()},
                    "n": {k: int(v) for k, v in acc["size"].items()}})
    return out


TURN_BINS = 12  # positions 0..11 each, then "12+"


def accuracy_by_turn(preds: pd.DataFrame) -> list[dict]:
    """WA per method/task/backbone by the utterance's position in its dialogue (turn 0, 1, ..., 12+).

    Pooled over seeds and folds, with Wilson 95% intervals over the pooled utterances
    (``statsmodels.stats.proportion.proportion_confint``; utterances are treated as independent, so
    read the bands as descriptive); records ``{"method", "task", "backbone", "wa", "ci_low",
    "ci_high", "n"}``, each but the first three keyed by bin. Memory should show as accuracy that
    rises with the position.
    """
    if preds.empty or "turn" not in preds:
        return []
    from statsmodels.stats.proportion import proportion_confint

    binned = preds.assign(turn_bin=preds["turn"].clip(upper=TURN_BINS))
    out = []
    for (m, t, b), g in binned.groupby(["method", "task", "backbone"], sort=False):
        acc = g.groupby("turn_bin")["correct"].agg(["sum", "size"]).sort_index()
        lo, hi = proportion_confint(acc["sum"], acc["size"], alpha=0.05, method="wilson")
        keys = [f"{TURN_BINS}+" if k >= TURN_BINS else str(int(k)) for k in acc.index]
        out.append({"method": m, "task": t, "backbone": b,
                    "wa": dict(zip(keys, (acc["sum"] / acc["size"]).astype(float))),
                    "ci_low": dict(zip(keys, np.asarray(lo, dtype=float))),
                    "ci_high": dict(zip(keys, np.asarray(hi, dtype=float))),
                    "n": dict(zip(keys, acc["size"].astype(int).tolist()))})
    return out


# ---------------------------------------------------------------------------- checks and the summary
def leakage_checks(ok: pd.DataFrame, tasks: dict[str, TaskSummary], alpha: float = 0.01) -> list[LeakageCheck]:
    """Context-free methods whose WA beats the task's context-free ceiling beyond noise.

    One-sided exact binomial test of each cell's correct count against
    ``TaskReference.context_free`` (``scipy.stats.binomtest``), Bonferroni-corrected over the cells
    tested. A flagged cell means information leaks into utterance-level predictions (labels, other
    utterances, or data reuse). Tasks without a context-free ceiling are not tested.
    """
    tested = []
    for _, r in ok[ok["uses_context"] == False].iterrows():  # noqa: E712
        ceiling = tasks[r["task"]].reference.context_free
        if ceiling is None:
            continue
        k, n = int(round(r["wa"] * r["n_test"])), int(r["n_test"])
        p = stats.binomtest(k, n, ceiling, alternative="greater").pvalue
        tested.append(LeakageCheck(r["method"], r["task"], int(r["seed"]), int(r["fold"]), float(r["wa"]),
                                   ceiling, float(p)))
    for t in tested:
        t.p_bonferroni = min(1.0, t.p_value * len(tested))
        t.leakage_suspected = bool(t.p_bonferroni < alpha)
    return tested


def selection_counts(cells: pd.DataFrame) -> dict:
    """``{"phase_2": k, "n": n}`` for cells (results.csv rows) of a two-stage method (``phases`` 2): in
    how many of them dev selection kept a Phase-2 epoch (else Phase 1: the memory unused); ``{}``
    for other methods or rows without the columns (results of older runs)."""
    if "phases" not in cells or "selected_phase" not in cells or not (cells["phases"] == 2).all():
        return {}
    return {"phase_2": int((cells["selected_phase"] == 2).sum()), "n": int(len(cells))}


def summarize(results: pd.DataFrame, preds: pd.DataFrame, tasks: dict[str, TaskSummary], baseline: str = "lora",
              n_resamples: int = 2000) -> Summary:
    """Mean / sd / 95% interval / n over seeds x folds per method/task/backbone, task references,
    checks, and paired comparisons against ``baseline`` (:func:`benchbench.stats.compare_all`)."""
    summary = Summary(tasks=dict(tasks))
    if results.empty:
        return summary
    failed = results[results["status"] == "failed"]
    summary.failed_cells = failed.drop(columns=["traceback"], errors="ignore").to_dict("records")
    ok = results[results["status"] == "ok"]
    if ok.empty:  # every cell failed: nothing to summarise beyond the failures
        return summary
    metric_cols = [c for c in ok.columns if c in METRICS or c.startswith("f1_")] + list(COST_COLUMNS)
    for (m, t, b), g in ok.groupby(["method", "task", "backbone"], sort=False):
        summary.cells.append(CellSummary(
            m, t, b, int(len(g)), sorted(g["seed"].unique().tolist()), sorted(g["fold"].unique().tolist()),
            {c: interval(g[c].dropna(), bounds=(0.0, 1.0) if c in METRICS or c.startswith("f1_") else None)
             for c in metric_cols if c in g and g[c].notna().any()}, selection_counts(g)))
    summary.leakage = leakage_checks(ok, tasks)
    if not preds.empty:
        summary.comparisons = compare_all(preds, {t: s.labels for t, s in tasks.items()}, reference=baseline,
                                          n_resamples=n_resamples)
        summary.by_speaker_history = accuracy_by_speaker_history(preds)
        summary.by_turn = accuracy_by_turn(preds)
        summary.context_references, reference_rows = label_history_references(preds, tasks, baseline)
        summary.tasks = _with_references(summary.tasks, summary.context_references)
        summary.gap_closed = gaps_closed(preds, summary.tasks, reference_rows, baseline, n_resamples)
        labels = {t: s.labels for t, s in tasks.items()}
        summary.decomposition = decompose(preds, labels, summary.comparisons, baseline, n_resamples)
        summary.phase_gate = phase_gate_audit(preds, ok, labels, baseline, n_resamples)
    return summary

# ---------------------------------------------------------------------------- dialogue vs capacity
VERDICTS = ("gains through the dialogue", "gains through capacity only", "gains, source unresolved",
            "no resolvable effect", "hurts")
"""The verdicts of :func:`verdict`; the rule is in docs/statistics.md ("Verdicts")."""


def verdict(total: dict, dialogue: dict | None, capacity: dict | None) -> str:
    """A method's verdict from the 95% dialogue-bootstrap intervals of its WA differences
    (:func:`benchbench.stats.paired_difference` records, fractions), in this order:

    1. ``hurts``: the total difference from the reference lies below 0 (upper end < 0);
    2. ``no resolvable effect``: the total's interval holds 0;
    3. ``gains through the dialogue``: the total lies above 0 and so does the part from the dialogue
       (the method minus its history-free self);
    4. ``gains through capacity only``: the total lies above 0, the dialogue part does not, and the
       capacity part (history-free self minus the reference) does;
    5. ``gains, source unresolved``: the total lies above 0 and neither part does alone (or there is
       no history-free control: ``dialogue`` and ``capacity`` None).

    A dialogue part above 0 under a total that is not (a memory that helps its own history-free self,
    which trails the reference) is not a gain over the reference: the table's dialogue column shows it."""
    if total["ci_high"] < 0:
        return "hurts"
    if not total["ci_low"] > 0:
        return "no resolvable effect"
    if dialogue is not None and dialogue["ci_low"] > 0:
        return "gains through the dialogue"
    if capacity is not None and capacity["ci_low"] > 0:
        return "gains through capacity only"
    return "gains, source unresolved"


def _against_reference(preds: pd.DataFrame, labels_by_task: dict, reference: str):
    """``(task, backbone, that group's rows, its labels, method)`` for every method other than
    ``reference`` of every task x backbone whose rows hold ``reference``, in order of appearance."""
    for (t, b), g in preds.groupby(["task", "backbone"], sort=False):
        if reference not in set(g["method"]):
            continue
        labels = list(labels_by_task.get(t) or sorted(g["label"].unique()))
        for m in [x for x in dict.fromkeys(g["method"]) if x != reference]:
            yield t, b, g, labels, m


def _has(rows: pd.DataFrame, column: str) -> bool:
    return column in rows and bool(rows[column].notna().all()) and bool((rows[column].astype(str) != "").all())


CAPACITY_CONTROL = "{history=false}"
"""The label suffix of a memory's trained capacity control (``--set mal.history=false``)."""


def decompose(preds: pd.DataFrame, labels_by_task: dict, comparisons: list[dict], reference: str = "lora",
              n_resamples: int = 2000) -> list[dict]:
    """Per method x task x backbone against ``reference``: the **total** WA / UA / WF1 / Macro-F1
    difference, the part **from the dialogue** (the method minus its own history-free control: the
    same fitted model, its state reset before every test utterance: ``prediction_nohist``) and the part
    from **capacity** (the control minus ``reference``), each a :func:`benchbench.stats.paired_difference`
    (the mean over cells, so total = dialogue + capacity; 95% bootstrap over test dialogues within
    folds; a t interval over folds); the slope of the WA difference over the speaker's earlier
    utterances (:func:`benchbench.stats.history_slope`); the comparison's Holm p and declared family
    (from ``comparisons``); the :func:`verdict`.

    Where the run also holds the method's trained capacity control (the same label with
    ``{history=false}``: the memory trained and evaluated without history), ``trained_control`` holds
    ``{"control": its label, "difference": method - control}`` (what the history adds against a memory
    trained without it), else ``None``.

    Records ``{"method", "task", "backbone", "reference", "total", "trained_control", "dialogue",
    "capacity", "history_slope", "holm_p", "family", "control", "verdict"}``; ``dialogue`` and ``capacity`` are
    ``None`` where the method's rows hold no history-free control (``control`` False: a run of an
    older suite, or a plugin whose state outlives ``reset``)."""
    from .stats import history_slope, paired_difference

    by_cmp = {(c["task"], c["backbone"], c["method"]): c for c in comparisons if c.get("reference") == reference}
    out = []
    for t, b, g, labels, m in _against_reference(preds, labels_by_task, reference):
        control = _has(g[g["method"] == m], "prediction_nohist")
        j = paired_rows(g, m, reference, ["dialogue_id", "label", "prediction", "correct", "speaker_history",
                                          "prediction_nohist"])
        if j.empty:
            continue
        cmp = by_cmp.get((t, b, m), {})
        # the comparison's difference is this one (stats.compare: the same rows, resamples and seed)
        total = cmp.get("bootstrap") or paired_difference(j, "prediction", "prediction_ref", labels, n_resamples)
        dialogue = paired_difference(j, "prediction", "prediction_nohist", labels, n_resamples) if control else None
        capacity = paired_difference(j, "prediction_nohist", "prediction_ref", labels, n_resamples) \
            if control else None
        slope = history_slope(j, n_resamples=n_resamples) if "speaker_history" in j else None
        trained = None
        control_label = m + CAPACITY_CONTROL
        if control_label in set(g["method"]):  # the same memory trained without history (history=false)
            k = paired_rows(g, m, control_label, ["dialogue_id", "label", "prediction"])
            if not k.empty:
                trained = {"control": control_label,
                           "difference": paired_difference(k, "prediction", "prediction_ref", labels, n_resamples)}
        out.append({"method": m, "task": t, "backbone": b, "reference": reference, "total": total,
                    "trained_control": trained,
                    "dialogue": dialogue, "capacity": capacity, "history_slope": slope,
                    "holm_p": (cmp.get("dialogues") or {}).get("wilcoxon_p_holm"),
                    "family": cmp.get("family"), "control": bool(control),
                    "verdict": verdict(total["wa"], dialogue["wa"] if dialogue else None,
                                       capacity["wa"] if capacity else None)})
    return out


def phase_gate_audit(preds: pd.DataFrame, rows: pd.DataFrame, labels_by_task: dict, reference: str = "lora",
                     n_resamples: int = 2000) -> list[dict]:
    """What the phase gate does, for every two-stage method whose cells saved both phases' test
    predictions (``prediction_phase1`` / ``prediction_phase2``) and dev scores (``dev_score_phase1`` /
    ``dev_score_phase2`` in ``rows``, results.csv): the gate keeps Phase 2 where its dev score beats
    Phase 1's. Per method x task x backbone: ``always_phase2`` and ``gated``, their WA differences
    from ``reference`` (:func:`benchbench.stats.paired_difference` records); ``kept`` (cells where the
    gate keeps Phase 2) of ``n``; the gate's hit rate: of the ``decisive`` cells (the phases' test WA
    differ), in how many it keeps the phase with the higher test WA (``hits``), with a one-sided exact
    binomial test against chance (``p_above_chance``, ``scipy.stats.binomtest``); ``gate_on``: cells
    that ran with the gate (their ``prediction`` is the gated one)."""
    from .stats import paired_difference

    need = {"dev_score_phase1", "dev_score_phase2", "cell_key"}
    if preds.empty or "prediction_phase1" not in preds or not need <= set(rows.columns):
        return []
    dev = rows.drop_duplicates("cell_key").set_index("cell_key")
    keep2 = dev["dev_score_phase2"].astype(float) > dev["dev_score_phase1"].astype(float)  # per cell: the gate
    out = []
    for t, b, g, labels, m in _against_reference(preds, labels_by_task, reference):
        mine = g[g["method"] == m]
        if not (_has(mine, "prediction_phase1") and _has(mine, "prediction_phase2")
                and mine["cell_key"].isin(dev.index).all()):
            continue
        j = paired_rows(g, m, reference, ["dialogue_id", "label", "prediction_phase1", "prediction_phase2",
                                          "cell_key"])
        j["prediction_gated"] = np.where(j["cell_key"].map(keep2), j["prediction_phase2"], j["prediction_phase1"])
        per_cell = j.assign(c1=j["prediction_phase1"] == j["label"], c2=j["prediction_phase2"] == j["label"]
                            ).groupby("cell_key")[["c1", "c2"]].mean()
        k2 = keep2.loc[per_cell.index].to_numpy()
        c1, c2 = per_cell["c1"].to_numpy(), per_cell["c2"].to_numpy()
        decisive = c1 != c2
        hits, n_dec = int(((k2 == (c2 > c1)) & decisive).sum()), int(decisive.sum())
        p = float(stats.binomtest(hits, n_dec, 0.5, alternative="greater").pvalue) if n_dec else float("nan")
        gate_on = int(dev.loc[per_cell.index, "phase_gate"].astype(str).eq("True").sum()) if "phase_gate" in dev else 0
        out.append({"method": m, "task": t, "backbone": b, "reference": reference,
                    "always_phase2": paired_difference(j, "prediction_phase2", "prediction_ref", labels,
                                                       n_resamples)["wa"],
                    "gated": paired_difference(j, "prediction_gated", "prediction_ref", labels, n_resamples)["wa"],
                    "kept": int(k2.sum()), "n": int(len(k2)), "hits": hits, "decisive": n_dec,
                    "hit_rate": hits / n_dec if n_dec else float("nan"), "p_above_chance": p, "gate_on": gate_on})
    return out


# ---------------------------------------------------------------------------- context references
REFERENCE_STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Strengths of the gold-label prior tried for the ``label_history`` reference (the best is kept, so
it is never below the utterance model: strength 0 is the model itself)."""
LABEL_HISTORY_ASSUMES = ("the reference method's posteriors combined with the same speaker's previous gold label "
                         "through speaker-transition statistics of the cell's training dialogues; gold previous "
                         "labels, which no method sees; strength chosen per fold on the other folds. A reference, "
                         "not a bound: a context method that reads more than the previous label can exceed it")


def fold_transitions(folds, n_classes: int) -> dict[str, dict]:
    """``{"<fold index>": {"A": [C][C], "prior": [C]}}``: the speaker-transition statistics of each
    fold's training dialogues (:func:`benchbench.inertia.speaker_transitions`, add-1 smoothing), as
    :class:`TaskSummary` keeps them for the ``label_history`` reference."""
    from .inertia import speaker_transitions

    out = {}
    for f in folds:
        A, prior = speaker_transitions(f.train, n_classes, smoothing=1.0)
        out[str(f.index)] = {"A": A.tolist(), "prior": prior.tolist()}
    return out


def _probs(rows: pd.DataFrame, labels: list[str]) -> np.ndarray:
    return rows[[f"p_{lab}" for lab in labels]].to_numpy(dtype=np.float64)


def label_history_references(preds: pd.DataFrame, tasks: dict[str, TaskSummary], reference: str = "lora"
                             ) -> tuple[list[dict], dict]:
    """The ``label_history`` context reference per task x backbone whose ``reference`` cells have
    predictions and whose task summary holds the folds' transition statistics: what the utterance
    model scores when it is also told the speaker's previous gold label. A reference, not a bound on
    what context can give (a method that reads the earlier audio can exceed it).

    Per test utterance of a ``reference`` cell: ``b ~ p(y | x) * (A[y_prev] / p(y)) ** lambda``
    (:func:`benchbench.inertia.label_history_posteriors`; y_prev the same speaker's previous scored
    gold label in the dialogue, A and p(y) from the cell's fold's training dialogues), with lambda from
    :data:`REFERENCE_STRENGTHS` chosen per fold on the *other* folds' utterances (their pooled WA;
    leave-one-fold-out, so no fold's strength is chosen on the labels it is scored on; a run of one
    fold chooses on its own, and says so in ``strength_chosen_on``). Returns ``(records,
    rows)``: records ``{"task", "backbone", "name": "label_history", "kind": "reference", "wa",
    "reference", "reference_wa", "strength" (None where folds chose differently), "strength_by_fold",
    "strength_chosen_on", "n_cells", "n", "assumes"}`` (fractions; ``"ceiling":
    "label_history"`` repeated as a deprecated alias of version 0.2) and, per (task, backbone), the
    reference method's rows with a ``target_correct`` column (for :func:`gaps_closed`)."""
    from .inertia import label_history_posteriors, previous_labels

    out, rows_of = [], {}
    ref = preds[preds["method"] == reference]
    for (t, b), g in ref.groupby(["task", "backbone"], sort=False):
        info = tasks.get(t)
        if info is None or not info.transitions or not info.labels:
            continue
        if not {str(f) for f in g["fold"].unique()} <= set(info.transitions):
            continue
        labels = list(info.labels)
        index = {lab: i for i, lab in enumerate(labels)}
        g = g.sort_values(["seed", "fold", "dialogue_id", "turn"]).copy()
        y = g["label"].map(index).to_numpy()
        correct = {s: np.zeros(len(g), dtype=bool) for s in REFERENCE_STRENGTHS}
        pos = 0
        for (seed, fold, _), d in g.groupby(["seed", "fold", "dialogue_id"], sort=False):
            tr = info.transitions[str(fold)]
            A, prior = np.asarray(tr["A"]), np.asarray(tr["prior"])
            yd = y[pos:pos + len(d)]
            prev = previous_labels(d["speaker"].astype(str).tolist(), yd)
            probs = _probs(d, labels)
            for s in REFERENCE_STRENGTHS:
                post = label_history_posteriors(probs, prev, A, prior, s)
                correct[s][pos:pos + len(d)] = post.argmax(-1) == yd
            pos += len(d)
        # each fold's strength is chosen on the other folds' utterances (leave-one-fold-out: never on
        # the labels it is scored on); with one fold, on its own (said in "strength_chosen_on")
        folds = g["fold"].to_numpy()
        chosen, target = {}, np.zeros(len(g), dtype=bool)
        for f in sorted(set(folds.tolist())):
            other = folds != f if (folds != f).any() else np.ones(len(g), dtype=bool)
            wa_other = {s: float(c[other].mean()) for s, c in correct.items()}
            chosen[str(f)] = max(REFERENCE_STRENGTHS, key=lambda s: (wa_other[s], -s))
            target[folds == f] = correct[chosen[str(f)]][folds == f]
        g["target_correct"] = target
        rows_of[(t, b)] = g
        values = sorted(set(chosen.values()))
        out.append({"task": t, "backbone": b, "name": "label_history", "kind": "reference", "ceiling": "label_history",
                    "wa": float(target.mean()), "reference": reference, "reference_wa": float(correct[0.0].mean()),
                    "strength": values[0] if len(values) == 1 else None, "strength_by_fold": chosen,
                    "strength_chosen_on": "the other folds" if len(chosen) > 1 else "its own fold, the run's only one",
                    "n_cells": int(g.groupby(["seed", "fold"]).ngroups), "n": int(len(g)),
                    "assumes": LABEL_HISTORY_ASSUMES})
    return out, rows_of


label_history_ceilings = label_history_references
"""Deprecated alias (version 0.2; removed in 0.3): ``label_history`` is a reference, not a ceiling."""


def _with_references(tasks: dict[str, TaskSummary], references: list[dict]) -> dict[str, TaskSummary]:
    """The task summaries with each ``label_history`` reference among their references
    (``label_history``; ``label_history@<backbone>`` where a task ran on several backbones)."""
    import dataclasses

    out = dict(tasks)
    per_task: dict[str, list[dict]] = {}
    for c in references:
        per_task.setdefault(c["task"], []).append(c)
    for t, cs in per_task.items():
        extra = {("label_history" if len(cs) == 1 else f"label_history@{c['backbone']}"): c["wa"] for c in cs}
        ref = out[t].reference
        out[t] = dataclasses.replace(out[t], reference=dataclasses.replace(ref, references={**ref.references, **extra}))
    return out


def gaps_closed(preds: pd.DataFrame, tasks: dict[str, TaskSummary], target_rows: dict,
                reference: str = "lora", n_resamples: int = 2000) -> list[dict]:
    """For every method of a task x backbone with a context target, the share of the
    ``reference``-to-target gap that the **dialogue** closes through it, ``(WA_m - WA_m,nohist) /
    (WA_target - WA_ref)`` on the test utterances both have (WA_m,nohist: the method's history-free
    control, so capacity on the current utterance is not credited to the dialogue; ``numerator``
    "dialogue"; a run without controls uses ``WA_m - WA_ref``, ``numerator`` "total"), with a 95%
    percentile interval from a dialogue bootstrap (scipy's ``bootstrap``, paired, resampling test
    dialogues: one unit per (fold, dialogue), its seeds within it). The target: where the task has
    one on its own test split (``synthetic``), its Bayes ``speaker_history`` rule (a constant, a true
    ceiling: ``target_kind`` "ceiling"); else the ``label_history`` reference (``target_rows``: the
    second value of :func:`label_history_references`; ``target_kind`` "reference": a share above 1
    means the method beat it). Records ``{"method", "task", "backbone", "reference", "target",
    "target_kind", "target_wa", "gap_closed", "ci_low", "ci_high", "n_dialogues", "numerator"}`` (``ceiling`` and
    ``ceiling_wa`` repeat ``target`` and ``target_wa``: deprecated aliases of version 0.2);
    ``gap_closed`` is NaN when the target does not exceed the reference."""
    out = []
    key = ["seed", "fold", "utterance_id"]
    for (t, b), g in preds.groupby(["task", "backbone"], sort=False):
        info = tasks.get(t)
        bayes = info.reference.test_ceilings.get("speaker_history") if info else None
        if bayes is not None:  # an exact Bayes ceiling of the task's own (synthetic): the better scale
            ref, name, kind, const = g[g["method"] == reference].copy(), "speaker_history", "ceiling", float(bayes)
        elif (t, b) in target_rows:
            ref, name, kind, const = target_rows[(t, b)], "label_history", "reference", None
        else:
            continue
        if ref.empty:
            continue
        ref = ref.assign(ref_correct=ref["prediction"] == ref["label"])
        for m in [x for x in g["method"].unique() if x != reference]:
            mine = g[g["method"] == m]
            # the dialogue's part only: the method against its own history-free self where it has one
            dialogue_part = _has(mine, "prediction_nohist")
            base = mine["prediction_nohist"] if dialogue_part else None
            mine = mine[key].assign(m_correct=(mine["prediction"] == mine["label"]).to_numpy(),
                                    b_correct=(base == mine["label"]).to_numpy() if dialogue_part else False)
            both = ref.merge(mine, on=key)
            if both.empty:
                continue
            if not dialogue_part:
                both["b_correct"] = both["ref_correct"]
            # the unit is the test dialogue (its seeds summed in it: one unit, not one per seed)
            both["cluster"] = both["fold"].astype(str) + "|" + both["dialogue_id"].astype(str)
            per = both.groupby("cluster").agg(m=("m_correct", "sum"), r=("ref_correct", "sum"), n=("m_correct", "size"),
                                              c=("target_correct", "sum") if const is None else ("m_correct", "size"),
                                              o=("b_correct", "sum"))
            arrays = (per["m"].to_numpy(float), per["r"].to_numpy(float), per["c"].to_numpy(float),
                      per["n"].to_numpy(float), per["o"].to_numpy(float))

            def ratio(mm, rr, cc, nn, oo, axis=-1):
                cw = cc.sum(axis) / nn.sum(axis) if const is None else const
                rw = rr.sum(axis) / nn.sum(axis)
                gap = cw - rw
                with np.errstate(divide="ignore", invalid="ignore"):
                    return np.where(gap > 0, (mm.sum(axis) - oo.sum(axis)) / nn.sum(axis) / np.where(gap > 0, gap, 1),
                                    np.nan)

            value = float(ratio(*arrays))
            lo = hi = float("nan")
            if len(per) > 1 and np.isfinite(value):
                res = stats.bootstrap(arrays, ratio, paired=True, vectorized=True, n_resamples=n_resamples,
                                      method="percentile", random_state=np.random.default_rng(0))
                lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
                if not np.isfinite(lo):  # scipy returns NaN for a degenerate (constant) distribution
                    lo, hi = (float(x) for x in np.nanpercentile(res.bootstrap_distribution, [2.5, 97.5]))
            target_wa = float(per["c"].sum() / per["n"].sum()) if const is None else const
            out.append({"method": m, "task": t, "backbone": b, "reference": reference, "target": name,
                        "target_kind": kind, "target_wa": target_wa, "ceiling": name, "ceiling_wa": target_wa,
                        "gap_closed": value, "ci_low": lo, "ci_high": hi, "n_dialogues": int(len(per)),
                        "numerator": "dialogue" if dialogue_part else "total"})
    return out


PREDICTION_COLUMNS = {"method", "task", "backbone", "fold", "seed", "dialogue_id", "utterance_id", "label",
                      "prediction", "correct"}


def compare_run_dir(run_dir: str | Path, reference: str = "lora", all_pairs: bool = False,
                    n_resamples: int = 2000) -> list[dict]:
    """Comparisons (:func:`benchbench.stats.compare_all`) recomputed from a ``bench run`` output folder.

    Raises:
        FileNotFoundError: ``predictions.csv`` or ``summary.json`` missing (named).
        ValueError: ``predictions.csv`` lacks a column, or ``summary.json`` is not a summary (named).
    """
    folder = Path(run_dir)
    preds_path, summary_path = folder / "predictions.csv", folder / "summary.json"
    for f in (preds_path, summary_path):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: not found (is {folder} a `bench run --output` folder?)")
    from .tracking import read_folder_predictions  # the recorded dtypes: ids such as "03" stay text

    preds = read_folder_predictions(preds_path)
    missing = PREDICTION_COLUMNS - set(preds.columns)
    if missing:
        raise ValueError(f"{preds_path}: missing columns {sorted(missing)}")
    tasks = Summary.read(summary_path).tasks
    labels = {t: info.labels or sorted(set(preds.loc[preds.task == t, "label"])) for t, info in tasks.items()}
    return compare_all(preds, labels, reference=reference, all_pairs=all_pairs, n_resamples=n_resamples)


# ---------------------------------------------------------------------------- the terminal report
def gap_target_text(g: dict) -> str:
    """What a :func:`gaps_closed` record is measured against, with its value in WA %: ``"Bayes ceiling
    speaker_history 80.52"`` or ``"reference label_history 82.60"``."""
    kind = g.get("target_kind", "ceiling")
    what = "Bayes ceiling" if kind == "ceiling" else "reference"
    return f"{what} {g.get('target', g.get('ceiling'))} {100 * g.get('target_wa', g.get('ceiling_wa')):.2f}"


def gap_text(g: dict) -> str:
    """A :func:`gaps_closed` share as text: ``"+27% [+20, +35]"``; a share above 100% says so
    (``"+123% [+80, +160] (beyond the reference)"``); empty when not computable."""
    if not np.isfinite(g["gap_closed"]):
        return ""
    ci = f" [{100 * g['ci_low']:+.0f}, {100 * g['ci_high']:+.0f}]" if np.isfinite(g["ci_low"]) else ""
    beyond = f" (beyond the {g.get('target_kind', 'ceiling')})" if g["gap_closed"] > 1 else ""
    return f"{100 * g['gap_closed']:+.0f}%{ci}{beyond}"


def diff_text(d: dict) -> str:
    """A :func:`benchbench.stats.paired_difference` record in points: ``"+4.82 [+2.10, +7.60]"``."""
    ci = f" [{100 * d['ci_low']:+.2f}, {100 * d['ci_high']:+.2f}]" if np.isfinite(d.get("ci_low", np.nan)) else ""
    return f"{100 * d['diff']:+.2f}{ci}"


def family_text(c: dict) -> str:
    """``" over the 10 comparisons of each method against lora on emodb · <backbone>"`` (the declared
    Holm family of a comparison), empty for a record without one."""
    f = c.get("family")
    return f" over the {f['size']} comparisons of {f['name']}" if f else ""


def strength_text(c: dict) -> str:
    """The ``label_history`` reference's strength as text: ``"strength 1"``, or per fold where folds
    chose differently (``"strength per fold 0.75, 1, ..."``), and where it was chosen."""
    if c.get("strength") is not None:
        where = c.get("strength_chosen_on")
        return f"strength {c['strength']:g}" + (f", chosen on {where}" if where else "")
    by = c.get("strength_by_fold") or {}
    return "strength per fold " + ", ".join(f"{v:g}" for _, v in sorted(by.items())) + \
        f" (each chosen on {c.get('strength_chosen_on', 'the other folds')})"


def format_summary(summary: Summary) -> str:
    """The terminal table: mean +/- sd per method/task/backbone, then references, comparisons, notices,
    leakage warnings and failed cells."""
    lines = []
    rows = []
    for c in summary.cells:
        s = c.stats
        rows.append({"task": c.task, "backbone": c.backbone, "method": c.method, "n": c.n,
                     **{m.upper(): f"{100 * s[m]['mean']:.2f} ± {100 * s[m]['sd']:.2f}" for m in METRICS if m in s},
                     "fit s": f"{s['fit_seconds']['mean']:.1f}",
                     "ms/utt": f"{s['eval_ms_per_utterance']['mean']:.1f}"})
    if rows:
        lines.append(pd.DataFrame(rows).to_string(index=False))
    for t, info in summary.tasks.items():
        ceil = info.reference.all_ceilings()
        if ceil:
            lines.append(f"{t} Bayes ceilings (WA %, rules that know how the data were made): "
                         + ", ".join(f"{k} {100 * v:.2f}" for k, v in ceil.items()))
        on_test = info.reference.test_ceilings
        if on_test:
            lines.append(f"{t} the same Bayes rules on this test split (WA %): " +
                         ", ".join(f"{k} {100 * v:.2f}" for k, v in on_test.items()))
    for c in summary.context_references:
        lines.append(f"{c['task']} {c['backbone']}: context reference label_history {100 * c['wa']:.2f} WA % "
                     f"({c['reference']} {100 * c['reference_wa']:.2f} + the speaker's previous gold label, "
                     f"{strength_text(c)}; gold previous labels, which no method sees; a reference, not a bound)")
    gaps = [g for g in summary.gap_closed if np.isfinite(g["gap_closed"])]
    if gaps:
        lines.append("share of the WA gap from the reference method to the target closed by the dialogue (the method "
                     "minus its history-free control; 95% bootstrap over test dialogues; above +100%: beyond the "
                     "target):")
        lines.append(pd.DataFrame([{"task": g["task"], "backbone": g["backbone"], "method": g["method"],
                                    "target": gap_target_text(g), "gap closed %": gap_text(g)}
                                   for g in gaps]).to_string(index=False))
    hist = summary.by_speaker_history
    if hist:
        lines.append("WA (%) by the speaker's earlier utterances in the dialogue:")
        lines.append(pd.DataFrame([{"task": h["task"], "backbone": h["backbone"], "method": h["method"],
                                    **{k: f"{100 * v:.1f}" for k, v in h["wa"].items()}} for h in hist]
                                  ).to_string(index=False))
    if summary.decomposition:
        lines.append("WA difference from the reference (pts; mean over cells, 95% bootstrap over test dialogues "
                     "within folds): total = from the dialogue (method - its history-free self) + capacity "
                     "(history-free self - reference); verdict by the rule of docs/statistics.md:")
        lines.append(pd.DataFrame([{"task": d["task"], "method": d["method"], "total": diff_text(d["total"]["wa"]),
                                    "dialogue": diff_text(d["dialogue"]["wa"]) if d["dialogue"] else "no control",
                                    "capacity": diff_text(d["capacity"]["wa"]) if d["capacity"] else "",
                                    "verdict": d["verdict"]} for d in summary.decomposition]).to_string(index=False))
    for g in summary.phase_gate:
        lines.append(f"{g['task']}: {g['method']} phase gate (keep Phase 2 where it beats Phase 1 on dev): keeps "
                     f"Phase 2 in {g['kept']}/{g['n']} cells, picks the phase better on test in {g['hits']}/"
                     f"{g['decisive']} cells where they differ (p above chance {g['p_above_chance']:.2g}); always "
                     f"Phase 2 {diff_text(g['always_phase2'])}, gated {diff_text(g['gated'])} pts vs {g['reference']}")
    for c in summary.comparisons:
        b, cells = c["bootstrap"]["wa"], c["cells"]
        cell_p = f", {cells['primary']} over {c['n_cells']} cells p={cells['primary_p']:.3g}" \
            if cells["primary_p"] is not None else ""
        lines.append(f"{c['task']}: {c['method']} - {c['reference']} WA {100 * b['diff']:+.2f} pts "
                     f"[95% dialogue bootstrap {100 * b['ci_low']:+.2f}, {100 * b['ci_high']:+.2f}] "
                     f"(Wilcoxon over {c['n_dialogues']} dialogues p={c['dialogues']['wilcoxon_p']:.3g}, "
                     f"Holm {c['dialogues']['wilcoxon_p_holm']:.3g}{family_text(c)}, "
                     f"r={c['dialogues']['rank_biserial']:+.2f}; "
                     f"McNemar p={c['mcnemar']['p_value']:.3g}{cell_p})")
    for task, info in summary.tasks.items():
        for notice in info.notices:
            lines.append(f"NOTICE {task}: {notice}")
    for chk in summary.leakage:
        if chk.leakage_suspected:
            lines.append(f"WARNING possible leakage: context-free {chk.method} (seed {chk.seed}, fold "
                         f"{chk.fold}) WA {100 * chk.wa:.2f} > ceiling {100 * chk.ceiling:.2f} "
                         f"(p={chk.p_bonferroni:.2g})")
    for f in summary.failed_cells:
        lines.append(f"FAILED {f['method']} {f['task']} seed {f['seed']} fold {f['fold']}: {f['error']}")
    return "\n".join(lines)
