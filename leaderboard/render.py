"""Leaderboard rendering: Markdown, LaTeX and a self-contained, sortable HTML page with plots.

Input is a :class:`benchbench.analysis.Summary` as :func:`benchbench.analysis.summarize` makes it (per method/task/backbone
intervals over seeds x folds, paired comparisons against the reference, accuracy by speaker history
and by position in the dialogue) plus the papers' reported numbers (``reported.csv``). Everything is
organised in *sections*, one per task x backbone; reported rows join the section of their task and
backbone (a section may hold reported rows only, e.g. IEMOCAP on Qwen2-Audio-7B until a GPU run is
logged).

Marks. A measured metric carries ▲ (better) or ▼ (worse than the reference method) when both the
95% dialogue-cluster bootstrap interval of the difference in that metric excludes 0 and the
Holm-corrected Wilcoxon signed-rank test over test dialogues gives p < 0.05
(:mod:`benchbench.stats`); otherwise no mark, whatever the means say.
"""

from __future__ import annotations

import html
import io
import math
from dataclasses import dataclass, field
from importlib.resources import files

import pandas as pd

from benchbench.analysis import Summary, diff_text, gap_target_text, gap_text
from benchbench.metrics import METRICS
from benchbench.names import backbone_note
from benchbench.task import TaskReference

METRIC_NAMES = {"wa": "WA", "ua": "UA", "wf1": "WF1", "macro_f1": "Macro-F1"}
# cost columns: summary key, header, format (the same in every output format)
COSTS = (("trained_parameters", "trained params", "{:,.0f}"), ("fit_seconds", "fit s", "{:.1f}"),
         ("eval_ms_per_utterance", "ms / utt", "{:.1f}"),
         ("test_time_update_ms_per_utterance", "of which test-time training", "{:.1f}"),
         ("peak_rss_mb", "peak RSS MiB", "{:.0f}"))
ALPHA = 0.05

PAPERS = {
    "titans-as-a-layer": {
        "key": "T", "short": "Titans-as-a-Layer",
        "cite": "D. Chen, Q. Hu, Y. Xiao, T. Dang, H. Jia. Titans-as-a-Layer: Test-Time Memory for "
                "Conversational Speech Emotion Recognition.",
    },
    "dynamic-parameter-memory": {
        "key": "D", "short": "DPM",
        "cite": "J. Mai, X. Xing, Y. Li, W. Chen, Z. Li, J. Xing, X. Xu. Dynamic Parameter Memory: "
                "Temporary LoRA-Enhanced LLM for Long-Sequence Emotion Recognition in Conversation.",
    },
}


def load_reported() -> pd.DataFrame:
    """The papers' reported numbers (``leaderboard/reported.csv``), metrics as fractions in [0, 1].

    Columns: source (a key of :data:`PAPERS`), table, task, backbone, method, wa, ua, wf1, macro_f1
    (NaN where the paper gives none), note (the paper's own row name).
    """
    with files("benchbench.leaderboard").joinpath("reported.csv").open() as f:
        df = pd.read_csv(f)
    for m in METRICS:
        df[m] = df[m] / 100.0
    unknown = set(df["source"]) - set(PAPERS)
    if unknown:
        raise ValueError(f"reported.csv: unknown source(s) {sorted(unknown)}; known: {sorted(PAPERS)}")
    return df


@dataclass
class Row:
    """One leaderboard row: a measured method (intervals over seeds x folds) or a reported one."""

    method: str
    kind: str                                   # "measured" | "reported"
    metrics: dict                               # metric -> {"mean", "ci_low", "ci_high", "sd"} or {"mean"}
    n: int | None = None
    n_seeds: int | None = None                  # measured: n = n_seeds x n_folds cells
    n_folds: int | None = None
    per_class: dict = field(default_factory=dict)   # label -> mean F1
    costs: dict = field(default_factory=dict)       # trained_parameters, fit_seconds, ...
    marks: dict = field(default_factory=dict)       # metric -> "▲" | "▼"
    comparison: dict | None = None                  # the stats.compare result against the reference
    source: str | None = None                       # reported: key of PAPERS
    table: str | None = None
    note: str | None = None
    selection: dict = field(default_factory=dict)   # two-stage: {"phase_2": cells keeping Phase 2, "n"}
    gap: dict | None = None                         # analysis.gaps_closed's record (share of the gap to its target)
    decomposition: dict | None = None               # analysis.decompose's record (dialogue / capacity, verdict)


@dataclass
class Section:
    task: str
    backbone: str
    rows: list[Row]
    labels: list[str]
    reference: TaskReference                    # the task's reference figures (ceilings, references)
    by_turn: list[dict]
    by_history: list[dict]

    @property
    def measured(self) -> list[Row]:
        return [r for r in self.rows if r.kind == "measured"]

    @property
    def reported(self) -> list[Row]:
        return [r for r in self.rows if r.kind == "reported"]


def _marks(comp: dict) -> dict:
    p = comp["dialogues"].get("wilcoxon_p_holm")
    if p is None or not p < ALPHA:
        return {}
    out = {}
    for m, b in comp["bootstrap"].items():
        if b["ci_low"] > 0:
            out[m] = "▲"
        elif b["ci_high"] < 0:
            out[m] = "▼"
    return out


def sections(summary: Summary, reported: pd.DataFrame | None = None, reference: str = "lora") -> list[Section]:
    """One section per task x backbone that was run: its measured rows sorted by WA, then the papers'
    reported rows for the same task and backbone (the others: :func:`unmatched_reported`).
    :attr:`Section.measured` and :attr:`Section.reported` split them."""
    out: dict[tuple, Section] = {}

    def section(task, backbone):
        if (task, backbone) not in out:
            info = summary.tasks.get(task)
            out[(task, backbone)] = Section(
                task, backbone, [], list(info.labels) if info else [],
                info.reference if info else TaskReference(),
                [h for h in summary.by_turn if h["task"] == task and h["backbone"] == backbone],
                [h for h in summary.by_speaker_history if h["task"] == task and h["backbone"] == backbone])
        return out[(task, backbone)]

    comps = {(c["task"], c["backbone"], c["method"]): c for c in summary.comparisons
             if c["reference"] == reference}
    gaps = {(g["task"], g["backbone"], g["method"]): g for g in summary.gap_closed if g["reference"] == reference}
    decs = {(d["task"], d["backbone"], d["method"]): d for d in summary.decomposition if d["reference"] == reference}
    for c in summary.cells:
        s = section(c.task, c.backbone)
        comp = comps.get((c.task, c.backbone, c.method))
        st = c.stats
        s.rows.append(Row(
            method=c.method, kind="measured", n=c.n, n_seeds=len(c.seeds) or None, n_folds=len(c.folds) or None,
            metrics={m: st[m] for m in METRICS if m in st},
            per_class={k.removeprefix("f1_"): v["mean"] for k, v in st.items() if k.startswith("f1_")},
            costs={k: st[k]["mean"] for k, _, _ in COSTS if k in st},
            marks=_marks(comp) if comp else {}, comparison=comp, selection=dict(c.selection),
            gap=gaps.get((c.task, c.backbone, c.method)), decomposition=decs.get((c.task, c.backbone, c.method))))
    for s in out.values():
        s.rows.sort(key=lambda r: -r.metrics["wa"]["mean"])
    if reported is not None:  # beside the runs of the same task and backbone; the rest: unmatched_reported()
        for r in reported.itertuples():
            if (r.task, r.backbone) not in out:
                continue
            out[(r.task, r.backbone)].rows.append(Row(
                method=r.method, kind="reported", metrics={m: {"mean": float(getattr(r, m))} for m in METRICS
                                                           if not pd.isna(getattr(r, m))},
                source=r.source, table=r.table, note=r.note))
    return list(out.values())


def unmatched_reported(summary: Summary, reported: pd.DataFrame | None) -> pd.DataFrame:
    """The papers' reported rows for task x backbone pairs nothing was run on (the compact table)."""
    if reported is None or not len(reported):
        return pd.DataFrame(columns=["task", "backbone", "method"])
    ran = {(c.task, c.backbone) for c in summary.cells}
    keep = [(t, b) not in ran for t, b in zip(reported["task"], reported["backbone"])]
    return reported[keep]


# ---------------------------------------------------------------------------- text formats
def _pct(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _metric_text(row: Row, m: str) -> str:
    v = row.metrics.get(m)
    if v is None:
        return "–"
    if row.kind == "reported" or math.isnan(v.get("ci_low", float("nan"))):
        return _pct(v["mean"]) + row.marks.get(m, "")
    return f"{_pct(v['mean'])} [{_pct(v['ci_low'])}, {_pct(v['ci_high'])}]{row.marks.get(m, '')}"


def _delta_text(row: Row) -> str:
    c = row.comparison
    if c is None:
        return ""
    b = c["bootstrap"]["wa"]
    p = c["dialogues"].get("wilcoxon_p_holm")
    return (f"{100 * b['diff']:+.2f} [{100 * b['ci_low']:+.2f}, {100 * b['ci_high']:+.2f}]"
            + (f" p={p:.2g}" if p is not None else ""))


def _dialogue_text(row: Row) -> str:
    """The part of the WA difference from the dialogue (the method against its history-free control)."""
    d = row.decomposition
    if d is None:
        return ""
    return diff_text(d["dialogue"]["wa"]) if d.get("dialogue") else "no control"


def _verdict_text(row: Row) -> str:
    return row.decomposition["verdict"] if row.decomposition else ""


def _gap_text(row: Row) -> str:
    return gap_text(row.gap) if row.gap is not None else ""


def _n_text(row: Row) -> str:
    """``"3 (3 x 1)"``: cells, as seeds x folds."""
    if row.n is None:
        return ""
    return f"{row.n} ({row.n_seeds} x {row.n_folds})" if row.n_seeds and row.n_folds else str(row.n)


def _gap_head(sec: Section, reference: str) -> str:
    """The gap column's header: what the share is measured against, with its value."""
    targets = {gap_target_text(r.gap) for r in sec.rows if r.gap is not None}
    if len(targets) == 1:
        return f"gap closed: {reference} -> {targets.pop()}"
    names = {gap_target_text(r.gap).rsplit(" ", 1)[0] for r in sec.rows if r.gap is not None}
    # methods run on fewer seeds than the reference are measured on the utterances both have: the
    # target's value differs by row and each cell names its own (_gap_td)
    return f"gap closed: {reference} -> {names.pop()} (value per row)" if len(names) == 1 else "gap closed"


def _cost_text(row: Row, key: str, fmt: str) -> str:
    return fmt.format(row.costs[key]) if key in row.costs else ""


def _method_text(row: Row) -> str:
    if row.kind == "reported":
        paper = PAPERS[row.source]
        return f"{row.method} (reported: {row.note}; {paper['short']} {row.table})"
    if row.selection and row.selection["phase_2"] < row.selection["n"]:  # the gate kept Phase 1 in the others
        return f"{row.method} (Phase 2 selected in {row.selection['phase_2']}/{row.selection['n']} cells)"
    return row.method


def _ceilings_text(sec: Section) -> str:
    """The section's Bayes ceilings and references, each with its value (WA %)."""
    ceil, refs = sec.reference.all_ceilings(), sec.reference.references
    parts = []
    if ceil:
        parts.append("Bayes ceilings (WA %): " + ", ".join(f"{k} {100 * v:.2f}" for k, v in ceil.items()))
    if sec.reference.test_ceilings:
        parts.append("on this test split: " + ", ".join(f"{k} {100 * v:.2f}"
                                                         for k, v in sec.reference.test_ceilings.items()))
    if refs:
        parts.append("context reference (WA %): " + ", ".join(f"{k} {100 * v:.2f}" for k, v in refs.items()))
    return ". ".join(parts)


def _legend_text(reference: str) -> str:
    return (f"Metrics in %, mean [95% t-interval over cells]; n = cells = seeds x folds. Δ: the mean over cells of "
            f"the paired difference, 95% bootstrap over test dialogues within folds. ▲/▼: better/worse than "
            f"{reference} with that interval excluding 0 and Holm-corrected Wilcoxon p < 0.05 over test dialogues "
            f"(family: each method against {reference} on the task and backbone). Of which from the dialogue: the "
            "method against its own history-free control (its state reset before every utterance); verdict: the "
            "rule of docs/statistics.md. Gap closed: the share of the WA distance from "
            f"{reference} to the named target (a Bayes ceiling, or a reference that a method may pass: above "
            "+100% says so) closed by the dialogue.")


def render_markdown(summary: Summary, reported: pd.DataFrame | None = None, reference: str = "lora") -> str:
    """Per task x backbone: a table of mean [95% interval] (in %) over seeds x folds, ▲/▼ marks against
    ``reference``, the WA difference with its dialogue-bootstrap interval and Holm p and the gap closed
    (its target named with its value); a second table of per-class F1 and costs; the papers' reported
    rows for the same task and backbone (italic); then the reported rows for what was not run."""
    out = []
    for sec in sections(summary, reported, reference):
        out.append(f"### {sec.task} · {sec.backbone}\n")
        if backbone_note(sec.backbone):
            out.append(f"*Backbone: {backbone_note(sec.backbone)}.*\n")
        verdicts = any(r.decomposition for r in sec.rows)
        head = ["method", "n (seeds x folds)", *(METRIC_NAMES[m] for m in METRICS), f"Δ WA vs {reference}",
                *(["of which from the dialogue", "verdict"] if verdicts else []), _gap_head(sec, reference)]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in sec.rows:
            name = _method_text(r)
            cells = [f"*{name}*" if r.kind == "reported" else name, _n_text(r),
                     *(_metric_text(r, m) for m in METRICS), _delta_text(r),
                     *([_dialogue_text(r), _verdict_text(r)] if verdicts else []), _gap_text(r)]
            out.append("| " + " | ".join(cells) + " |")
        if _ceilings_text(sec):
            out.append("\n" + _ceilings_text(sec))
        labels = sec.labels or sorted({k for r in sec.measured for k in r.per_class})
        head = ["method", *(f"F1 {lab}" for lab in labels), *(h for _, h, _ in COSTS)]
        out.append("\n| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in sec.measured:
            out.append("| " + " | ".join([r.method, *(_pct(r.per_class.get(lab)) for lab in labels),
                                          *(_cost_text(r, k, fmt) for k, _, fmt in COSTS)]) + " |")
        out.append("")
    rest = unmatched_reported(summary, reported)
    if len(rest):
        out.append("### Reported by the papers (tasks and backbones not run here)\n")
        out.append("| task | backbone | method | WA | UA | WF1 | source |")
        out.append("|---|---|---|---|---|---|---|")
        for r in rest.itertuples():
            vals = [("–" if pd.isna(getattr(r, m)) else _pct(float(getattr(r, m)))) for m in ("wa", "ua", "wf1")]
            out.append(f"| {r.task} | {r.backbone} | {r.method} ({r.note}) | " + " | ".join(vals)
                       + f" | {PAPERS[r.source]['short']} {r.table} |")
        out.append("")
    if reported is not None and len(reported):
        out.append("Reported rows: " + "; ".join(f"{p['short']}: {p['cite']}" for p in PAPERS.values()))
    out.append("\n" + _legend_text(reference))
    return "\n".join(out) + "\n"


def render_latex(summary: Summary, reported: pd.DataFrame | None = None, reference: str = "lora") -> str:
    """One ``tabular`` per task x backbone (pandas Styler), metrics as mean [95% interval] in %."""
    parts = []
    for sec in sections(summary, reported, reference):
        df = pd.DataFrame([{"method": _method_text(r).replace("{", r"\{").replace("}", r"\}"), "n": r.n or "",
                            **{METRIC_NAMES[m]: _metric_text(r, m) for m in METRICS}} for r in sec.rows])
        body = df.style.hide(axis="index").to_latex(hrules=True)
        parts.append(f"% {sec.task} / {sec.backbone}\n" + body.replace("%", r"\%").replace("▲", r"$\uparrow$")
                     .replace("▼", r"$\downarrow$").replace("_", r"\_").replace("–", "--"))
    return "\n".join(parts)


# ---------------------------------------------------------------------------- plots (inline SVG)
def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(fig)
    s = buf.getvalue()
    return s[s.index("<svg"):]


def _mpl():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "benchbench", "font.size": 9})
    return plt


def _metric_range(sec: Section) -> tuple[float, float]:
    """One x-range (in %) for every metric panel of a section: every mean, interval and reference line,
    padded."""
    xs = []
    for r in sec.rows:
        for v in r.metrics.values():
            xs += [x for x in (v["mean"], v.get("ci_low"), v.get("ci_high")) if x is not None and math.isfinite(x)]
    xs += list(sec.reference.all_ceilings().values()) + list(sec.reference.references.values())
    lo, hi = 100 * min(xs), 100 * max(xs)
    pad = max(2.0, 0.05 * (hi - lo))
    return max(0.0, lo - pad), min(100.0, hi + pad)


def plot_metrics(sec: Section) -> str:
    """Each metric per method on one shared x-range: measured means with 95% interval bars, reported
    values as hollow diamonds; on WA the task's ceilings and references as vertical lines, named in a
    legend below the panels (never over the data). Returns an ``<svg>`` string."""
    plt = _mpl()
    rows = sec.rows
    fig, axes = plt.subplots(1, len(METRICS), figsize=(2.6 * len(METRICS), 0.35 * len(rows) + 1.3),
                             sharey=True, sharex=True, squeeze=False)
    labels = [r.method if r.kind == "measured" else f"{r.method} ({PAPERS[r.source]['key']}: {r.note})"[:48]
              for r in rows]
    lines = {**sec.reference.all_ceilings(), **{f"{k} (reference)": v for k, v in sec.reference.references.items()}}
    for ax, m in zip(axes[0], METRICS):
        for y, r in enumerate(rows):
            v = r.metrics.get(m)
            if v is None:
                continue
            if r.kind == "reported":
                ax.plot(100 * v["mean"], y, marker="D", mfc="none", color="#7a5195", ms=5)
            else:
                lo, hi = v.get("ci_low", float("nan")), v.get("ci_high", float("nan"))
                err = None if math.isnan(lo) else [[100 * (v["mean"] - lo)], [100 * (hi - v["mean"])]]
                ax.errorbar(100 * v["mean"], y, xerr=err, fmt="o", color="#003f5c", capsize=3, ms=4)
        if m == "wa":
            for (k, c), style in zip(lines.items(), ("--", ":", "-.", (0, (1, 3)), (0, (5, 2)))):
                ax.axvline(100 * c, color="#ef5675", ls=style, lw=1, label=f"{k} {100 * c:.1f}")
        ax.set_title(METRIC_NAMES[m] + " (%)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_xlim(*_metric_range(sec))
    axes[0][0].set_yticks(range(len(rows)), labels)
    axes[0][0].invert_yaxis()
    if lines:
        fig.legend(*axes[0][0].get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.0),
                   ncol=min(len(lines), 4), fontsize=7, frameon=False)
    return _svg(fig)


def plot_costs(sec: Section) -> str | None:
    """Cost against accuracy, the trade-off a method is chosen by: WA (mean, 95% interval) against
    inference ms per utterance and against training seconds per cell, one labelled point per measured
    method. None when the section has no costs."""
    rows = [r for r in sec.measured if "wa" in r.metrics and "eval_ms_per_utterance" in r.costs]
    if not rows:
        return None
    plt = _mpl()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharey=True)
    for ax, key, label in ((axes[0], "eval_ms_per_utterance", "inference ms per utterance"),
                           (axes[1], "fit_seconds", "training seconds per cell")):
        for r in rows:
            if key not in r.costs:
                continue
            v = r.metrics["wa"]
            lo, hi = v.get("ci_low", float("nan")), v.get("ci_high", float("nan"))
            err = None if math.isnan(lo) else [[100 * (v["mean"] - lo)], [100 * (hi - v["mean"])]]
            ax.errorbar(r.costs[key], 100 * v["mean"], yerr=err, fmt="o", color="#003f5c", capsize=3, ms=4)
            ax.annotate(r.method, (r.costs[key], 100 * v["mean"]), fontsize=7, textcoords="offset points",
                        xytext=(5, 8 - 11 * (rows.index(r) % 3)))  # staggered: neighbours' names do not overlap
        ax.set_xlabel(label)
        ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("WA (%)")
    return _svg(fig)


def plot_position(sec: Section) -> str | None:
    """WA by position in the dialogue (turn) and by the speaker's earlier utterances, one line per
    measured method with Wilson 95% bands; None when the section has no per-utterance data."""
    if not sec.by_turn:
        return None
    plt = _mpl()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.2), gridspec_kw={"width_ratios": [2, 1]})
    for h in sec.by_turn:
        keys = list(h["wa"])
        x = range(len(keys))
        a1.plot(x, [100 * h["wa"][k] for k in keys], marker="o", ms=3, label=h["method"])
        a1.fill_between(x, [100 * h["ci_low"][k] for k in keys], [100 * h["ci_high"][k] for k in keys], alpha=0.12)
        a1.set_xticks(list(x), keys)
    a1.set_xlabel("position in the dialogue (turn)")
    a1.set_ylabel("WA (%)")
    a1.set_title("accuracy by position (pooled over seeds x folds, Wilson 95%)")
    for h in sec.by_history:
        keys = list(h["wa"])
        a2.plot(range(len(keys)), [100 * h["wa"][k] for k in keys], marker="o", ms=3, label=h["method"])
        a2.set_xticks(range(len(keys)), keys)
    a2.set_xlabel("speaker's earlier utterances")
    a2.set_title("accuracy by speaker history")
    for k, c in sec.reference.all_ceilings().items():
        if k in ("context_free", "speaker_history"):
            for ax in (a1, a2):
                ax.axhline(100 * c, color="#ef5675", ls="--" if k == "context_free" else ":", lw=1)
    a2.legend(*a1.get_legend_handles_labels(), fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.02, 1))
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    return _svg(fig)


# ---------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1400px;color:#222;padding:0 1em;box-sizing:border-box}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2.2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
table.main{width:100%}
th,td{padding:.3em .55em;border-bottom:1px solid #eee;text-align:right;vertical-align:top}
td{white-space:nowrap}th{white-space:normal}
th{background:#f4f6f8;cursor:pointer;user-select:none;position:sticky;top:0}
th[aria-sort=ascending]::after{content:" ↑"}th[aria-sort=descending]::after{content:" ↓"}
td.name,th.name{text-align:left}
tr.reported td{font-style:italic;color:#5a3f73;background:#faf6fd}
tr.reference td.name{font-weight:600}
.ci{color:#777;font-size:.85em;display:block}.sub{color:#777;font-size:.8em;display:block;font-weight:400}
.up{color:#1a7f37;font-weight:700}.down{color:#c62828;font-weight:700}
.note{color:#555;font-size:.85em;max-width:70em}.scroll{overflow-x:auto}
details{margin:.4em 0}summary{cursor:pointer;color:#333;font-size:.9em}
figure{margin:.5em 0}svg{max-width:100%;height:auto}
"""

_JS = """
document.querySelectorAll('table.sortable').forEach(function (table) {
  table.querySelectorAll('th').forEach(function (th, col) {
    th.addEventListener('click', function () {
      var asc = th.getAttribute('aria-sort') === 'descending';  // first click: descending
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col].getAttribute('data-v'), y = b.cells[col].getAttribute('data-v');
        if (x === '' && y === '') return 0;
        if (x === '') return 1;
        if (y === '') return -1;
        var nx = parseFloat(x), ny = parseFloat(y);
        var c = (isNaN(nx) || isNaN(ny)) ? x.localeCompare(y) : nx - ny;
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
      table.querySelectorAll('th').forEach(function (h) { h.setAttribute('aria-sort', 'none'); });
      th.setAttribute('aria-sort', asc ? 'ascending' : 'descending');
    });
  });
});
"""


def _td(text: str, value=None, cls: str = "") -> str:
    v = "" if value is None or (isinstance(value, float) and math.isnan(value)) else value
    c = f' class="{cls}"' if cls else ""
    return f'<td{c} data-v="{html.escape(str(v))}">{text}</td>'


def _metric_td(r: Row, m: str) -> str:
    v = r.metrics.get(m)
    if v is None:
        return _td("–")
    mark = r.marks.get(m, "")
    mark_html = f' <span class="{"up" if mark == "▲" else "down"}">{mark}</span>' if mark else ""
    ci = ""
    if r.kind == "measured" and not math.isnan(v.get("ci_low", float("nan"))):
        ci = f' <span class="ci">[{_pct(v["ci_low"])}, {_pct(v["ci_high"])}]</span>'
    return _td(f"{_pct(v['mean'])}{ci}{mark_html}", round(100 * v["mean"], 4))


def _sortable(head: list[str], names: int, trs: list[str], cls: str = "") -> str:
    ths = "".join(f'<th class="name" aria-sort="none">{html.escape(h)}</th>' if i < names else
                  f'<th aria-sort="none">{html.escape(h)}</th>' for i, h in enumerate(head))
    return (f'<table class="sortable {cls}"><thead><tr>' + ths + "</tr></thead><tbody>" + "".join(trs)
            + "</tbody></table>")


def _name_td(r: Row) -> str:
    sub = f'<span class="sub">Phase 2 selected in {r.selection["phase_2"]}/{r.selection["n"]} cells</span>' \
        if r.selection else ""
    return _td(html.escape(r.method) + sub, r.method, "name")


def _delta_td(r: Row) -> str:
    c = r.comparison
    if c is None:
        return _td("")
    b, p = c["bootstrap"]["wa"], c["dialogues"].get("wilcoxon_p_holm")
    ci = f"[{100 * b['ci_low']:+.2f}, {100 * b['ci_high']:+.2f}]" + (f" p={p:.2g}" if p is not None else "")
    return _td(f"{100 * b['diff']:+.2f}<span class=\"ci\">{html.escape(ci)}</span>", round(100 * b["diff"], 4))


def _gap_td(r: Row) -> str:
    if r.gap is None or not math.isfinite(r.gap["gap_closed"]):
        return _td("")
    text = gap_text(r.gap)
    head, _, rest = text.partition(" ")
    rest += f" of {100 * r.gap.get('target_wa', r.gap.get('ceiling_wa')):.2f}"
    return _td(html.escape(head) + (f'<span class="ci">{html.escape(rest)}</span>' if rest else ""),
               round(100 * r.gap["gap_closed"], 4))


def _section_html(sec: Section, reference: str, index: int) -> str:
    """One task x backbone: the main table (fits 1400 px: method, n, the four metrics, the difference to
    the reference and the gap closed), per-class F1 and costs in a second, collapsed table, the plots,
    and the papers' reported rows for the same task and backbone."""
    labels = sec.labels or sorted({k for r in sec.measured for k in r.per_class})
    verdicts = any(r.decomposition for r in sec.measured)
    head = ["method", "n (seeds x folds)", *(METRIC_NAMES[m] for m in METRICS), f"Δ WA vs {reference} [95% CI], Holm p",
            *(["verdict"] if verdicts else []), _gap_head(sec, reference)]
    trs = [f'<tr class="{"reference" if r.method == reference else "measured"}">'
           + "".join([_name_td(r), _td(_n_text(r), r.n), *(_metric_td(r, m) for m in METRICS), _delta_td(r),
                      *([_td(html.escape(_verdict_text(r)), _verdict_text(r))] if verdicts else []),
                      _gap_td(r)]) + "</tr>" for r in sec.measured]
    detail = [f'<tr>{_td(html.escape(r.method), r.method, "name")}'
              + "".join(_td(_pct(r.per_class[lab]), round(100 * r.per_class[lab], 4)) if lab in r.per_class
                        else _td("") for lab in labels)
              + "".join(_td(_cost_text(r, k, fmt), r.costs.get(k)) for k, _, fmt in COSTS) + "</tr>"
              for r in sec.measured]
    parts = [f'<section id="s{index}"><h2>{html.escape(sec.task)} · {html.escape(sec.backbone)}</h2>']
    if backbone_note(sec.backbone):
        parts.append(f'<p class="note"><strong>Backbone:</strong> {html.escape(backbone_note(sec.backbone))}.</p>')
    if _ceilings_text(sec):
        parts.append(f'<p class="note">{html.escape(_ceilings_text(sec))}. Bayes ceilings know how the task was '
                     "generated: <em>context_free</em> is what no utterance-level method can beat, "
                     "<em>speaker_history</em> what the speaker's earlier utterances allow. <em>label_history</em> "
                     f"is a reference, not a bound: {html.escape(reference)}'s posteriors plus the speaker's previous "
                     "gold label, which no method sees; a context method can pass it.</p>")
    parts.append(_sortable(head, 1, trs, "main"))
    parts.append('<details><summary>Per-class F1 and costs</summary><div class="scroll">'
                 + _sortable(["method", *(f"F1 {lab}" for lab in labels), *(h for _, h, _ in COSTS)], 1, detail)
                 + "</div></details>")
    if sec.reported:
        rep = [f'<tr class="reported">{_td(html.escape(r.method), r.method, "name")}'
               f'{_td(_reported_source(r), r.source, "name")}'
               + "".join(_metric_td(r, m) for m in METRICS) + "</tr>" for r in sec.reported]
        parts.append("<details open><summary>Reported by the papers for this task and backbone (their data and "
                     "hardware: read beside, not against)</summary>"
                     + _sortable(["method", "source", *(METRIC_NAMES[m] for m in METRICS)], 2, rep) + "</details>")
    parts.append(f"<figure>{plot_metrics(sec)}<figcaption class=\"note\">Mean over seeds x folds with 95% "
                 "t-interval bars, one x-range for the four metrics; hollow diamonds: reported by the papers."
                 "</figcaption></figure>")
    costs = plot_costs(sec)
    if costs:
        parts.append(f"<figure>{costs}<figcaption class=\"note\">Cost against accuracy: WA (95% interval) against "
                     "inference milliseconds per utterance and training seconds per cell (means over cells, on the "
                     "machine of the run; test-time training counts as inference).</figcaption></figure>")
    pos = plot_position(sec)
    if pos:
        parts.append(f"<figure>{pos}<figcaption class=\"note\">Where memory should show: accuracy by the "
                     "utterance's position in its dialogue and by how many earlier utterances its speaker "
                     "had. Dashed: the context-free ceiling; dotted: the speaker-history ceiling.</figcaption>"
                     "</figure>")
    parts.append("</section>")
    return "\n".join(parts)


def _reported_source(r: Row) -> str:
    paper = PAPERS[r.source]
    return (f'<a href="#ref-{paper["key"]}">[{paper["key"]}]</a> {html.escape(paper["short"])} '
            f'{html.escape(r.table)}: {html.escape(r.note)}')


def render_html(summary: Summary, reported: pd.DataFrame | None = None, reference: str = "lora",
                title: str = "benchbench leaderboard", provenance: str = "") -> str:
    """The self-contained page (inline CSS, JS and SVG; nothing fetched): per task x backbone a
    sortable main table that fits 1400 px, per-class F1 and costs collapsed, metric plots on one
    x-range, cost against accuracy, accuracy by dialogue position; the papers' reported rows for
    what was not run, collapsed at the end."""
    secs = [s for s in sections(summary, reported, reference) if s.measured]
    toc = "".join(f'<li><a href="#s{i}">{html.escape(s.task)} · {html.escape(s.backbone)}</a></li>'
                  for i, s in enumerate(secs))
    refs = "".join(f'<li id="ref-{p["key"]}">[{p["key"]}] {html.escape(p["cite"])}</li>' for p in PAPERS.values())
    body = "\n".join(_section_html(s, reference, i) for i, s in enumerate(secs))
    rest = unmatched_reported(summary, reported)
    if len(rest):
        toc += '<li><a href="#reported">reported by the papers (not run here)</a></li>'
        trs = "".join(
            "<tr class=\"reported\">" + "".join(f"<td class=\"name\">{html.escape(str(v))}</td>" for v in (
                r.task, r.backbone, f"{r.method} ({r.note})")) + "".join(
                f"<td>{'–' if pd.isna(getattr(r, m)) else _pct(float(getattr(r, m)))}</td>"
                for m in ("wa", "ua", "wf1")) + f"<td class=\"name\">{html.escape(PAPERS[r.source]['short'])} "
            f"{html.escape(r.table)}</td></tr>" for r in rest.itertuples())
        body += ('\n<h2 id="reported">Reported by the papers (tasks and backbones not run here)</h2>'
                 f'<details><summary>{len(rest)} rows of the papers\' tables, on their data and hardware</summary>'
                 '<table><thead><tr><th class="name">task</th><th class="name">backbone</th><th class="name">method'
                 '</th><th>WA</th><th>UA</th><th>WF1</th><th class="name">source</th></tr></thead>'
                 f'<tbody>{trs}</tbody></table></details>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style>
<link rel="icon" href="data:,"></head>
<body><h1>{html.escape(title)}</h1>
<p class="note">Context and memory methods for conversational speech emotion recognition, side by side on the
same backbones, data, folds and seeds. Metrics in %: mean over the cells (n = seeds x folds) with its 95%
Student-t interval below it. <span class="up">▲</span>/<span class="down">▼</span>: better / worse than
<b>{html.escape(reference)}</b> with the 95% dialogue-cluster bootstrap interval of the difference excluding 0
<em>and</em> the Holm-corrected Wilcoxon signed-rank test over test dialogues at p &lt; {ALPHA}. Gap closed: each
method's share of the WA distance from {html.escape(reference)} to the target named in the column header (a
Bayes ceiling, or a reference a method can pass: above +100% it did). Click a column header to sort (first
click: descending).</p>
<p class="note">{provenance}</p>
<ul>{toc}</ul>
{body}
<h2>References</h2><ol class="note" style="list-style:none">{refs}</ol>
<script>{_JS}</script>
</body></html>
"""
