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

from benchbench.analysis import Summary
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
    per_class: dict = field(default_factory=dict)   # label -> mean F1
    costs: dict = field(default_factory=dict)       # trained_parameters, fit_seconds, ...
    marks: dict = field(default_factory=dict)       # metric -> "▲" | "▼"
    comparison: dict | None = None                  # the stats.compare result against the reference
    source: str | None = None                       # reported: key of PAPERS
    table: str | None = None
    note: str | None = None
    selection: dict = field(default_factory=dict)   # two-stage: {"phase_2": cells keeping Phase 2, "n"}
    gap: dict | None = None                         # analysis.gaps_closed's record (share of the gap to the ceiling)


@dataclass
class Section:
    task: str
    backbone: str
    rows: list[Row]
    labels: list[str]
    reference: TaskReference                    # the task's reference figures (ceilings, ...)
    by_turn: list[dict]
    by_history: list[dict]


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
    reported rows for the same task and backbone (the others: :func:`unmatched_reported`)."""
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
    for c in summary.cells:
        s = section(c.task, c.backbone)
        comp = comps.get((c.task, c.backbone, c.method))
        st = c.stats
        s.rows.append(Row(
            method=c.method, kind="measured", n=c.n,
            metrics={m: st[m] for m in METRICS if m in st},
            per_class={k.removeprefix("f1_"): v["mean"] for k, v in st.items() if k.startswith("f1_")},
            costs={k: st[k]["mean"] for k, _, _ in COSTS if k in st},
            marks=_marks(comp) if comp else {}, comparison=comp, selection=dict(c.selection),
            gap=gaps.get((c.task, c.backbone, c.method))))
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


def _gap_text(row: Row) -> str:
    g = row.gap
    if g is None or not math.isfinite(g["gap_closed"]):
        return ""
    ci = f" [{100 * g['ci_low']:+.0f}, {100 * g['ci_high']:+.0f}]" if math.isfinite(g["ci_low"]) else ""
    return f"{100 * g['gap_closed']:+.0f}%{ci}"


def _cost_text(row: Row, key: str, fmt: str) -> str:
    return fmt.format(row.costs[key]) if key in row.costs else ""


def _method_text(row: Row) -> str:
    if row.kind == "reported":
        paper = PAPERS[row.source]
        return f"{row.method} (reported: {row.note}; {paper['short']} {row.table})"
    if row.selection:  # dev kept Phase 1 (the memory unused) in the other cells
        return f"{row.method} (Phase 2 selected in {row.selection['phase_2']}/{row.selection['n']} cells)"
    return row.method


def _ceilings_text(sec: Section) -> str:
    ceil = sec.reference.all_ceilings()
    return ("Reference ceilings (WA %): " + ", ".join(f"{k} {100 * v:.2f}" for k, v in ceil.items())) if ceil else ""


def render_markdown(summary: Summary, reported: pd.DataFrame | None = None, reference: str = "lora") -> str:
    """A Markdown table per task x backbone: mean [95% interval] (in %) over seeds x folds, ▲/▼ marks
    against ``reference``, the WA difference with its dialogue-bootstrap interval and Holm p, costs;
    then the papers' reported rows (italic) and references."""
    out = []
    for sec in sections(summary, reported, reference):
        out.append(f"### {sec.task} · {sec.backbone}\n")
        if backbone_note(sec.backbone):
            out.append(f"*Backbone: {backbone_note(sec.backbone)}.*\n")
        head = ["method", "n", *(METRIC_NAMES[m] for m in METRICS), f"Δ WA vs {reference}",
                "gap to ceiling closed", *(h for _, h, _ in COSTS)]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in sec.rows:
            name = _method_text(r)
            cells = [f"*{name}*" if r.kind == "reported" else name, str(r.n or ""),
                     *(_metric_text(r, m) for m in METRICS), _delta_text(r), _gap_text(r),
                     *(_cost_text(r, k, fmt) for k, _, fmt in COSTS)]
            out.append("| " + " | ".join(cells) + " |")
        if _ceilings_text(sec):
            out.append("\n" + _ceilings_text(sec))
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
    out.append(f"\nMetrics in %, mean [95% t-interval over seeds x folds]. ▲/▼: better/worse than {reference} "
               "with the dialogue-bootstrap 95% interval excluding 0 and Holm-corrected Wilcoxon p < 0.05 "
               "over test dialogues.")
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


def plot_metrics(sec: Section) -> str:
    """Each metric per method: measured means with 95% interval bars, reported values as hollow
    diamonds; on WA the task's ceilings as dashed lines. Returns an ``<svg>`` string."""
    plt = _mpl()
    rows = sec.rows
    fig, axes = plt.subplots(1, len(METRICS), figsize=(2.6 * len(METRICS), 0.35 * len(rows) + 1.1),
                             sharey=True, squeeze=False)
    labels = [r.method if r.kind == "measured" else f"{r.method} ({PAPERS[r.source]['key']}: {r.note})"[:48]
              for r in rows]
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
            for (k, c), style in zip(sec.reference.all_ceilings().items(), ("--", ":", "-.", (0, (1, 3)))):
                ax.axvline(100 * c, color="#ef5675", ls=style, lw=1, label=k)
            if sec.reference.all_ceilings():
                ax.legend(fontsize=7, loc="lower right", frameon=False)
        ax.set_title(METRIC_NAMES[m] + " (%)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(len(rows)), labels)
    axes[0][0].invert_yaxis()
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
    a1.legend(fontsize=7, frameon=False, ncol=2)
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
    return _svg(fig)


# ---------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1400px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{font-size:1.25em;margin-top:2.2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.6em 0}
th,td{padding:.3em .55em;border-bottom:1px solid #eee;text-align:right;white-space:nowrap}
th{background:#f4f6f8;cursor:pointer;user-select:none;position:sticky;top:0}
th[aria-sort=ascending]::after{content:" ↑"}th[aria-sort=descending]::after{content:" ↓"}
td.name,th.name{text-align:left}
tr.reported td{font-style:italic;color:#5a3f73;background:#faf6fd}
tr.reference td.name{font-weight:600}
.ci{color:#777;font-size:.85em}.up{color:#1a7f37;font-weight:700}.down{color:#c62828;font-weight:700}
.note{color:#555;font-size:.85em;max-width:70em}.scroll{overflow-x:auto}
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


def _section_html(sec: Section, reference: str, index: int) -> str:
    labels = sec.labels or sorted({k for r in sec.rows for k in r.per_class})
    head = ["method", "source", "n", *(METRIC_NAMES[m] for m in METRICS), f"Δ WA vs {reference} [95% CI] (Holm p)",
            "gap to ceiling closed [95% CI]", *(f"F1 {lab}" for lab in labels), *(h for _, h, _ in COSTS)]
    ths = "".join(f'<th class="name" aria-sort="none">{html.escape(h)}</th>' if i < 2 else
                  f'<th aria-sort="none">{html.escape(h)}</th>' for i, h in enumerate(head))
    trs = []
    for r in sec.rows:
        if r.kind == "reported":
            paper = PAPERS[r.source]
            src = (f'<a href="#ref-{paper["key"]}">[{paper["key"]}]</a> {html.escape(paper["short"])} '
                   f'{html.escape(r.table)}: {html.escape(r.note)}')
            cls = "reported"
        else:
            src, cls = "measured here", "reference" if r.method == reference else "measured"
        delta = ""
        if r.comparison is not None:
            b = r.comparison["bootstrap"]["wa"]
            delta = _td(html.escape(_delta_text(r)), round(100 * b["diff"], 4))
        else:
            delta = _td("")
        cells = [_td(html.escape(_method_text(r) if r.kind == "measured" else r.method), r.method, "name"), _td(src, r.kind, "name"), _td(str(r.n or ""), r.n),
                 *(_metric_td(r, m) for m in METRICS), delta,
                 _td(html.escape(_gap_text(r)), round(100 * r.gap["gap_closed"], 4)
                     if r.gap is not None and math.isfinite(r.gap["gap_closed"]) else None),
                 *(_td(_pct(r.per_class[lab]), round(100 * r.per_class[lab], 4)) if lab in r.per_class else _td("")
                   for lab in labels),
                 *(_td(_cost_text(r, k, fmt), r.costs.get(k)) for k, _, fmt in COSTS)]
        trs.append(f'<tr class="{cls}">' + "".join(cells) + "</tr>")
    parts = [f'<section id="s{index}"><h2>{html.escape(sec.task)} · {html.escape(sec.backbone)}</h2>']
    if backbone_note(sec.backbone):
        parts.append(f'<p class="note"><strong>Backbone:</strong> {html.escape(backbone_note(sec.backbone))}.</p>')
    if _ceilings_text(sec):
        parts.append(f'<p class="note">{html.escape(_ceilings_text(sec))} (Bayes accuracies from the task\'s '
                     "latents: <em>context_free</em> is what no utterance-level method can beat; "
                     "<em>label_history</em>: the reference's posteriors plus the speaker's previous gold label, "
                     "which no method sees; the gap column is each method's share of the distance from the "
                     "reference to that ceiling)</p>")
    parts.append('<div class="scroll"><table class="sortable"><thead><tr>' + ths + "</tr></thead><tbody>"
                 + "".join(trs) + "</tbody></table></div>")
    parts.append(f"<figure>{plot_metrics(sec)}<figcaption class=\"note\">Mean over seeds x folds with 95% "
                 "t-interval bars; hollow diamonds: reported by the papers.</figcaption></figure>")
    pos = plot_position(sec)
    if pos:
        parts.append(f"<figure>{pos}<figcaption class=\"note\">Where memory should show: accuracy by the "
                     "utterance's position in its dialogue and by how many earlier utterances its speaker "
                     "had. Dashed: the context-free ceiling; dotted: the speaker-history ceiling.</figcaption>"
                     "</figure>")
    parts.append("</section>")
    return "\n".join(parts)


def render_html(summary: Summary, reported: pd.DataFrame | None = None, reference: str = "lora",
                title: str = "benchbench leaderboard", provenance: str = "") -> str:
    """The self-contained page (inline CSS, JS and SVG; nothing fetched): a sortable table per
    task x backbone, metric plots with interval bars, accuracy by dialogue position, reported rows."""
    secs = sections(summary, reported, reference)
    toc = "".join(f'<li><a href="#s{i}">{html.escape(s.task)} · {html.escape(s.backbone)}</a>'
                  f'{"" if any(r.kind == "measured" for r in s.rows) else " (reported only)"}</li>'
                  for i, s in enumerate(secs))
    refs = "".join(f'<li id="ref-{p["key"]}">[{p["key"]}] {html.escape(p["cite"])}</li>' for p in PAPERS.values())
    body = "\n".join(_section_html(s, reference, i) for i, s in enumerate(secs))
    rest = unmatched_reported(summary, reported)
    if len(rest):
        toc += '<li><a href="#reported">reported by the papers (not run here)</a></li>'
        trs = "".join(
            "<tr class=\"reported\">" + "".join(f"<td>{html.escape(str(v))}</td>" for v in (
                r.task, r.backbone, f"{r.method} ({r.note})",
                *("–" if pd.isna(getattr(r, m)) else _pct(float(getattr(r, m))) for m in ("wa", "ua", "wf1")),
                f"{PAPERS[r.source]['short']} {r.table}")) + "</tr>" for r in rest.itertuples())
        body += ('\n<h2 id="reported">Reported by the papers (tasks and backbones not run here)</h2>'
                 '<table><thead><tr><th>task</th><th>backbone</th><th>method</th><th>WA</th><th>UA</th><th>WF1</th>'
                 f'<th>source</th></tr></thead><tbody>{trs}</tbody></table>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_CSS}</style>
<link rel="icon" href="data:,"></head>
<body><h1>{html.escape(title)}</h1>
<p class="note">Context and memory methods for conversational speech emotion recognition, side by side on the
same backbones, data, folds and seeds. Metrics in %: mean over seeds x folds with its 95% Student-t interval.
<span class="up">▲</span>/<span class="down">▼</span>: better / worse than <b>{html.escape(reference)}</b>
with the 95% dialogue-cluster bootstrap interval of the difference excluding 0 <em>and</em> the Holm-corrected
Wilcoxon signed-rank test over test dialogues at p &lt; {ALPHA}. Italic purple rows are numbers reported by the
papers, on their own data and hardware: read them beside, not against, the measured rows. Click a column
header to sort (first click: descending).</p>
<p class="note">{provenance}</p>
<ul>{toc}</ul>
{body}
<h2>References</h2><ol class="note" style="list-style:none">{refs}</ol>
<script>{_JS}</script>
</body></html>
"""
