"""Committed runs and the documents rendered from them: every number the README and the docs publish.

A *committed run* is a folder ``results/<name>/`` that holds what one command printed and wrote, and
where it ran:

- ``run.json``: the exact command, the suite commit it ran on (and whether the tree was dirty), the
  suite version, the machine (CPU model, cores, platform, Python, torch build), the wall time of
  each attempt (a run resumed over several sessions has several) and the exit status;
- ``stdout.txt``: what the command printed;
- for ``bench probe``: ``probe.csv`` (its rows, :data:`benchbench.probe.COLUMNS`);
- for ``bench run``: ``summary.json``, ``results.csv`` and ``predictions.csv.gz`` (every scored test
  utterance, compressed; the leaderboard and every statistic are recomputed from them) with
  ``predictions-dtypes.json``, and ``curves.csv.gz`` (every trained stage's dev score per epoch and
  training loss per step, from the cells' records).

Commands (``python -m benchbench.tools.publish ...``)::

    record NAME -- bench run --methods lora,mal --tasks synthetic    # run it, keep it in results/NAME
    join NAME PART PART ...                                          # one run of several (same machine, code)
    render                                                           # rewrite every generated block
    check                                                            # exit 1 naming each stale block

``record`` runs ``bench run`` with a private output folder and MLflow store under
``results/<name>/.work/`` (not committed), so no cell is reused from another store; the same
``record`` again resumes there (finished cells are kept; the wall time of each attempt is recorded).
Several commands separated by ``';'`` share that folder: a second ``bench run`` adds a method's other
form (or another backbone) to the first's cells, the committed ``summary.json`` summarises the cells of
every command (:func:`whole_summary`), and a closing ``bench compare --all-pairs`` (no folder: the
recorder gives it the run's) keeps its ``comparisons.json``::

    record forms -- bench run --methods lora,mal --tasks synthetic ';' \
        bench run --methods mal --tasks synthetic --set mal.surprise=sequential ';' bench compare --all-pairs

A benchmark longer than a session is recorded in parts (a seed each: ``record NAME-s0 -- bench run
... --seeds 0``, then ``--seeds 1`` ...) on one machine and one code, and ``join NAME NAME-s0 NAME-s1 ...``
makes them one committed run whose summary spans every part's cells (:func:`join` says what it refuses).

A generated block in a Markdown file (``README.md``, ``docs/**.md``) sits between two markers::

    <!-- results:NAME VIEW -->
    ...what the generator makes of results/NAME for VIEW...
    <!-- /results -->

Views: ``terminal`` (what the command printed, as a code block; left out: the per-epoch progress
lines of each cell, and the line naming the output folder and MLflow store, a private path), ``command`` (the command as a code block),
``provenance`` (one line: command, commit, machine, wall time), ``table`` (per method: n as seeds x
folds, WA / UA / WF1 with 95% intervals, the WA difference to the reference method with its
dialogue-bootstrap interval and Holm p, the share of the gap to the task's target closed, named with
its value), ``costs`` (fit seconds, inference ms per utterance, trained parameters, peak memory),
``selection`` (two-stage methods: in how many cells dev kept Phase 2), ``history`` (WA by the
speaker's earlier utterances in the dialogue), ``folds`` (per method and fold: WA and fit seconds),
``curves`` (every trained stage's dev score and mean training loss per epoch, from ``curves.csv.gz``, which
``record`` keeps from the cells' records), ``forms`` (the run's
``bench compare --all-pairs`` between two forms of one method: WA difference, dialogue-bootstrap
interval, Holm-corrected Wilcoxon and McNemar), ``paper-scale`` (a
``python -m benchbench.tools.paper_scale`` run: per backbone and method, seconds per epoch, inference
ms per utterance, peak CUDA memory, trained parameters), ``probe`` (the ``probe.csv`` that ``record``
keeps of its ``bench probe`` commands, their rows joined in command order: per task, backbone and
fold, the linear probe's test WA / UA and its dev-chosen C, then the means). ``render`` rewrites the
blocks in place; ``check`` (and the test suite, ``tests/test_publish.py``) fails when a block differs
from what the generator makes of the committed folders, so a changed result is regenerated, never
edited by hand. Timings are of the machine in ``run.json``: never compare them across runs of
different machines.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results"
DOCUMENTS = ("README.md", "docs")
BLOCK = re.compile(r"(<!-- results:(?P<name>[\w.-]+) (?P<view>[\w-]+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)
PRIVATE_LINE = re.compile(r"^results: .*\(MLflow: .*$", re.M)
PROGRESS_LINE = re.compile(r"^  \[[^\]]+\] .*$\n?", re.M)


# ---------------------------------------------------------------------------- the machine
def machine() -> dict:
    """What a timing depends on: CPU model, logical cores, platform, Python, the torch build and the
    CPU's bf16 kernels (:func:`benchbench.backbone.bf16_kernels`: ``amx``, ``avx512_bf16`` or
    ``emulated``; one CPU model name covers CPUs with and without AVX512-BF16, and they differ in speed
    and in what ``--autocast auto`` chooses)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import torch

        torch_build = torch.__version__
    except ImportError:
        torch_build = None
    from benchbench.backbone import bf16_kernels

    return {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch_build, "bf16_kernels": bf16_kernels("cpu")}


def _git(*args: str) -> str:
    """``git args`` in the suite's checkout, its output stripped; ``""`` where it fails (no repository, as
    in a copied tree or an installed package, or no git program)."""
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        return ""


def _version() -> str:
    """The suite's version as the checked-out ``pyproject.toml`` says (an editable install's metadata
    keeps the version it was installed at)."""
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# ---------------------------------------------------------------------------- record
CODE_PACKAGES = ("benchbench", "benchbench.methods", "benchbench.tasks", "benchbench.backbones",
                 "benchbench.leaderboard")
"""The packages a recorded command runs: all of them must come from the checkout whose commit the run
records."""


def check_code_root(root: Path = ROOT) -> None:
    """``ValueError`` naming the package and where it would be imported from, when one of
    :data:`CODE_PACKAGES` resolves outside ``root``. An editable install maps ``benchbench.methods``,
    ``.tasks``, ``.backbones`` and ``.leaderboard`` to the checkout it was installed from, whatever
    ``PYTHONPATH`` says, so a run recorded from a second checkout (a git worktree) would compute its cells
    with the other checkout's methods while ``run.json`` names this one's commit."""
    import importlib.util

    for pkg in CODE_PACKAGES:
        spec = importlib.util.find_spec(pkg)
        where = Path(spec.origin if spec and spec.origin else next(iter(spec.submodule_search_locations or []), "."))
        if not where.resolve().is_relative_to(Path(root).resolve()):
            raise ValueError(f"{pkg} would be imported from {where.parent}, not from the checkout being recorded "
                             f"({root}): install this checkout (pip install -e {root}) or record from the other one")


def record(name: str, command: list[str], results: Path = RESULTS) -> int:
    """Run ``command`` (a ``bench ...`` command line, or several separated by ``;`` tokens) and keep what
    it printed and wrote in ``results/<name>/`` (module docstring). Returns the exit status of the
    last command run (the first that fails stops the rest).

    Several commands share the run's output folder and MLflow store: a second ``bench run`` adds its
    cells to the first's (a method's other form beside its default, say), and ``bench compare`` (given
    no folder: the recorder passes the run's) writes ``comparisons.json``, kept beside the summary.

    Raises ``ValueError`` for a name that is not a plain folder name, a command that is not a
    ``bench`` command, a ``bench run`` command that sets ``--output`` or ``--tracking-uri`` itself
    (the recorder owns both), when ``results/<name>`` holds another command's run, and when the
    suite's packages would be imported from another checkout than the one recorded
    (:func:`check_code_root`).
    """
    check_code_root()
    if not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"run name {name!r}: use letters, digits, '.', '_' and '-' only")
    commands = [[]]
    for token in command:
        if token == ";":
            commands.append([])
        else:
            commands[-1].append(token)
    if not all(c and c[0] == "bench" for c in commands):
        raise ValueError(f"{shlex.join(command)!r}: a committed run is a `bench` command (several: separated by ';')")
    folder = results / name
    meta_path = folder / "run.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    text = "\n".join(shlex.join(c) for c in commands)
    if meta is not None and meta["command"] != text:
        raise ValueError(f"{folder}: holds the run of `{meta['command']}`, not `{text}` (choose another name, "
                         "or remove the folder to record this command in its place)")
    work = folder / ".work"
    argvs = []
    for c in commands:
        argv = list(c[1:])
        # what the recorder gives each command kind (its own folder, MLflow store, probe file under work)
        given = {"run": ["--output", str(work / "out"), "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}",
                         "--no-progress"],
                 "compare": [str(work / "out")],
                 "probe": ["--output", str(work / f"probe-{len(argvs)}.csv")]}.get(argv[0] if argv else "", [])
        owned = {a for a in given if a in ("--output", "--tracking-uri")} & {a.split("=", 1)[0] for a in argv}
        if owned:
            raise ValueError(f"{sorted(owned)[0]}: the recorder sets it (the run's own files under {work})")
        argv += given  # a probe's file is one a command, joined below
        argvs.append(argv)
    from benchbench.tracking import package_versions

    work.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    commit = _git("rev-parse", "HEAD")
    # the tracked files that differ from the commit as the run starts (staged or not)
    dirty_paths = _git("diff", "--name-only", "HEAD").splitlines()
    t0 = time.perf_counter()
    stdout, stderr, returncode = [], [], 0
    for c, argv in zip(commands, argvs):
        proc = subprocess.run([sys.executable, "-m", "benchbench.cli", *argv], cwd=ROOT, capture_output=True,
                              text=True, check=False)
        stdout.append(proc.stdout if len(commands) == 1 else f"$ {shlex.join(c)}\n{proc.stdout}")
        stderr.append(proc.stderr)
        returncode = proc.returncode
        if returncode:
            break
    wall = time.perf_counter() - t0
    (work / "stderr.txt").write_text("".join(stderr))
    sys.stderr.write("".join(stderr)[-4000:])
    attempts = (meta or {}).get("attempts", []) + [{"started": started.isoformat(timespec="seconds"),
                                                     "wall_seconds": round(wall, 1), "exit_status": returncode}]
    meta = {"command": text, "commit": commit, "dirty": bool(dirty_paths), "dirty_paths": dirty_paths,
            # as the run started (the tree may move on)
            "version": _version(), "machine": machine(), "versions": package_versions(), "attempts": attempts,
            "wall_seconds": round(sum(a["wall_seconds"] for a in attempts), 1), "exit_status": returncode}
    (folder / "stdout.txt").write_text("".join(stdout))
    out = work / "out"
    if (out / "summary.json").is_file():
        if sum(argv[:1] == ["run"] for argv in argvs) > 1:
            whole_summary(out, folder / "summary.json")
        else:
            shutil.copyfile(out / "summary.json", folder / "summary.json")
        shutil.copyfile(out / "results.csv", folder / "results.csv")
        if (out / "predictions-dtypes.json").is_file():
            shutil.copyfile(out / "predictions-dtypes.json", folder / "predictions-dtypes.json")
        if (out / "comparisons.json").is_file():
            shutil.copyfile(out / "comparisons.json", folder / "comparisons.json")
        from benchbench.tracking import read_folder_predictions

        preds = read_folder_predictions(out / "predictions.csv")
        preds.to_csv(folder / "predictions.csv.gz", index=False, compression={"method": "gzip", "mtime": 0})
        keep_curves(out, folder)
    probes = [work / f"probe-{k}.csv" for k, argv in enumerate(argvs) if argv[:1] == ["probe"]]
    if any(p.is_file() for p in probes):  # every probe command's rows, in command order
        import pandas as pd

        pd.concat([pd.read_csv(p) for p in probes if p.is_file()]).to_csv(folder / "probe.csv", index=False)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return returncode


def whole_summary(out: Path, target: Path) -> Path:
    """The summary of every cell in a run folder that several ``bench run`` commands wrote into.

    Each ``bench run`` summarises its own cells only (``out/summary.json`` is the last command's);
    ``results.csv`` and ``predictions.csv`` keep every command's. This summarises them all
    (:func:`benchbench.analysis.summarize`: statistics, paired comparisons against the run's baseline
    within each task and backbone, references, gaps) with the last command's task facts and run
    facts, and writes it to ``target``.

    Raises:
        ValueError: a cell's task is not among the last command's tasks (its facts are unknown here;
            record such runs separately).
    """
    import pandas as pd

    from benchbench.analysis import Summary, summarize
    from benchbench.tracking import read_folder_predictions

    last = Summary.read(out / "summary.json")
    rows = pd.read_csv(out / "results.csv")
    unknown = sorted(set(rows["task"]) - set(last.tasks))
    if unknown:
        raise ValueError(f"{out}: cells of task(s) {', '.join(unknown)} that the last command did not run; "
                         "record each task's commands as a run of its own")
    whole = summarize(rows, read_folder_predictions(out / "predictions.csv"), last.tasks,
                      last.run.get("spec", {}).get("baseline", "lora"))
    whole.run = last.run
    whole.write(target)
    return target


CURVE_COLUMNS = ["task", "backbone", "method", "seed", "fold", "phase1_replayed", "curve", "step", "value"]


def keep_curves(out: Path, folder: Path) -> Path | None:
    """The curves of every cell a run computed (``out/cells/<cell_key>/record.json``: each
    training stage's ``<stage>_train_loss`` and ``<stage>_dev_<metric>``, stage ``align`` / ``lora`` /
    the method's Phase 2) as ``folder/curves.csv.gz``, one row per (cell, curve, step counted from 1:
    the epoch of a dev curve, the optimiser step of a training loss, as MLflow holds them),
    with the cell's task, backbone, method, seed, fold and ``phase1_replayed`` from ``out/results.csv``
    (a replayed Phase 1 brings its cell of origin's curves, identical, into the record). A cell reused from
    an earlier run into the same folder has its folder too, so a resumed run keeps every cell's curves.
    Returns the file written (``None``: no cell recorded a curve)."""
    import pandas as pd

    rows = pd.read_csv(out / "results.csv")
    rows = rows[rows["status"] == "ok"]
    found = []
    for r in rows.itertuples():
        path = out / "cells" / str(r.cell_key) / "record.json"
        if not path.is_file():
            continue
        replayed = str(getattr(r, "phase1_replayed", "")) == "True"
        for curve, values in json.loads(path.read_text()).get("curves", {}).items():
            found += [(r.task, r.backbone, r.method, int(r.seed), int(r.fold), replayed, curve, i + 1, float(v))
                      for i, v in enumerate(values)]
    if not found:
        return None
    target = folder / "curves.csv.gz"
    pd.DataFrame(found, columns=CURVE_COLUMNS).to_csv(target, index=False, compression={"method": "gzip", "mtime": 0})
    return target


# what a commit may change between the parts of a joined run: files no cell's computation imports or reads
NON_CELL_PATHS = ("results/", "docs/", "tests/", ".ci/", "README.md", "CHANGELOG.md", "CONTRIBUTING.md",
                  "ARCHITECTURE.md", "mkdocs.yml", "benchbench/tools/publish.py")
MACHINE_KEYS = ("cpu", "cores", "python", "torch", "gpu", "gpu_memory_gb", "bf16_kernels")


def join(name: str, parts: list[str], results: Path = RESULTS, accept: dict[str, str] | None = None) -> Path:
    """One committed run ``results/<name>/`` made of several (``parts``, each a committed ``bench run``
    run): a benchmark longer than a session recorded in parts (a seed each, say) and published as one,
    its summary (statistics, paired comparisons, references, gaps) over every part's cells, so every view
    works on it. ``run.json`` holds each part's command, commit, attempts and wall time (``parts``),
    every part's attempts and their summed wall time; ``stdout.txt`` each part's output under its name.

    The parts must be comparable, or the join refuses (``ValueError`` naming the part and the problem):
    each finished (exit status 0); the same machine (:data:`MACHINE_KEYS` of ``run.json``: timings and
    bf16 scores compare within one machine only); the same package versions (``run.json``'s
    ``versions``, where both parts recorded them); the same code (one commit, or commits that differ only
    in :data:`NON_CELL_PATHS`: ``git diff`` says); the same data (each task's manifest sha256); and no
    cell (task, backbone, method, seed, fold) in two parts. ``check`` (:func:`stale`) fails when a part's
    cells no longer are the joined run's. ``FileNotFoundError`` names a part that is not committed.

    ``accept`` (``--accept PATH=REASON``): code paths whose difference between the parts' commits the
    person joining has read and found not to change what the cells compute (e.g. a change to a cell key
    alone), each with the reason. They are kept in ``run.json`` (``accepted_code_differences``) and the
    provenance line names them with the reason; a path in ``accept`` that no part's commit changes is
    refused (an acceptance says what was read, never more)."""
    import pandas as pd

    from benchbench.analysis import summarize
    from leaderboard.collect import collect_folders

    if not re.fullmatch(r"[\w.-]+", name):
        raise ValueError(f"run name {name!r}: use letters, digits, '.', '_' and '-' only")
    if len(parts) < 2 or len(set(parts)) != len(parts) or name in parts:
        raise ValueError(f"join {name}: give two or more distinct committed runs other than {name} (got {parts})")
    runs = [CommittedRun(results / p) for p in parts]
    first = runs[0]
    accept, accepted = accept or {}, {}
    for r in runs:
        if r.meta["exit_status"] != 0:
            raise ValueError(f"results/{r.name}: its command exited with {r.meta['exit_status']}: not a finished run")
        if not (r.folder / "results.csv").is_file():
            raise ValueError(f"results/{r.name}: holds no cells (a `bench run` run is joined, not {r.meta['command']!r})")
        # bf16_kernels: compared where both parts recorded it (run.json before it did not)
        keys = [k for k in MACHINE_KEYS if k != "bf16_kernels" or all(
            "bf16_kernels" in m["machine"] for m in (r.meta, first.meta))]
        mine, theirs = ({k: m["machine"].get(k) for k in keys} for m in (r.meta, first.meta))
        if mine != theirs:
            diff = ", ".join(f"{k} {theirs[k]!r} vs {mine[k]!r}" for k in keys if mine[k] != theirs[k])
            raise ValueError(f"results/{r.name}: ran on another machine than results/{first.name} ({diff}); "
                             "timings and bf16 scores compare within one machine only")
        versions = [m.get("versions") for m in (first.meta, r.meta)]
        if all(versions) and versions[0] != versions[1]:  # compared where both parts recorded them
            diff = ", ".join(f"{k} {versions[0].get(k)} vs {versions[1].get(k)}"
                             for k in sorted({*versions[0], *versions[1]}) if versions[0].get(k) != versions[1].get(k)
                             and k != "benchbench")
            if diff:
                raise ValueError(f"results/{r.name}: ran on other package versions than results/{first.name} ({diff})")
        if r.meta["commit"] != first.meta["commit"]:
            diff = subprocess.run(["git", "diff", "--name-only", first.meta["commit"], r.meta["commit"]], cwd=ROOT,
                                  capture_output=True, text=True, check=False)
            if diff.returncode:
                raise ValueError(f"results/{r.name}: cannot compare its commit {r.meta['commit'][:10]} with results/"
                                 f"{first.name}'s {first.meta['commit'][:10]} (git diff: {diff.stderr.strip()[:200]})")
            changed = diff.stdout.splitlines()
            code = [f for f in changed if not f.startswith(NON_CELL_PATHS) and f not in accept]
            for f in set(changed) & set(accept):
                accepted.setdefault(f, {"path": f, "reason": accept[f], "commits": [first.meta["commit"]]})
                accepted[f]["commits"] = sorted({*accepted[f]["commits"], r.meta["commit"]})
            if code:
                raise ValueError(f"results/{r.name}: commit {r.meta['commit'][:10]} differs from results/{first.name}'s "
                                 f"{first.meta['commit'][:10]} in code the cells ran: {', '.join(code[:5])}"
                                 f"{f' and {len(code) - 5} more' if len(code) > 5 else ''}")
    unused = sorted(set(accept) - set(accepted))
    if unused:
        raise ValueError(f"--accept {unused[0]}: no part's commit differs from results/{first.name}'s in it "
                         "(accept only a difference that is there)")
    manifests: dict[str, tuple] = {}
    for r in runs:
        for task, info in r.summary.tasks.items():
            if manifests.setdefault(task, (info.manifest_sha256, r.name))[0] != info.manifest_sha256:
                raise ValueError(f"results/{r.name}: task {task}'s data manifest differs from results/"
                                 f"{manifests[task][1]}'s (another copy of the data)")
    seen: dict[tuple, str] = {}
    for r in runs:
        for c in _rows(r)[["task", "backbone", "method", "seed", "fold"]].itertuples(index=False):
            if tuple(c) in seen:
                raise ValueError(f"results/{r.name}: cell {tuple(c)} is also in results/{seen[tuple(c)]}; "
                                 "each cell belongs to one part")
            seen[tuple(c)] = r.name
    collected = collect_folders([r.folder for r in runs])
    summary = summarize(collected.results, collected.predictions, collected.task_info,
                        first.summary.run.get("spec", {}).get("baseline", "lora"))
    summary.run = {**first.summary.run, "joined": parts}
    folder = results / name
    folder.mkdir(parents=True, exist_ok=True)
    summary.write(folder / "summary.json")
    pd.concat([pd.read_csv(r.folder / "results.csv", dtype={"cell_key": str}) for r in runs]) \
        .to_csv(folder / "results.csv", index=False)
    preds = pd.concat([pd.read_csv(r.folder / "predictions.csv.gz", dtype=str, keep_default_na=False) for r in runs])
    preds.to_csv(folder / "predictions.csv.gz", index=False, compression={"method": "gzip", "mtime": 0})
    shutil.copyfile(first.folder / "predictions-dtypes.json", folder / "predictions-dtypes.json")
    curves = [pd.read_csv(r.folder / "curves.csv.gz") for r in runs if (r.folder / "curves.csv.gz").is_file()]
    if curves:
        pd.concat(curves).to_csv(folder / "curves.csv.gz", index=False, compression={"method": "gzip", "mtime": 0})
    (folder / "stdout.txt").write_text("".join(f"# results/{r.name}\n{r.stdout}" for r in runs))
    attempts = [a for r in runs for a in r.meta["attempts"]]
    meta = {"command": "\n".join(r.meta["command"] for r in runs), "commit": first.meta["commit"],
            "dirty": any(r.meta["dirty"] for r in runs),
            "dirty_paths": sorted({p for r in runs for p in r.meta.get("dirty_paths", [])}),
            "version": first.meta["version"], "machine": first.meta["machine"],
            **({"versions": first.meta["versions"]} if first.meta.get("versions") else {}), "attempts": attempts,
            "wall_seconds": round(sum(a["wall_seconds"] for a in attempts), 1), "exit_status": 0,
            "parts": [{"name": r.name, "command": r.meta["command"], "commit": r.meta["commit"],
                       "wall_seconds": r.meta["wall_seconds"]} for r in runs],
            **({"accepted_code_differences": [accepted[f] for f in sorted(accepted)]} if accepted else {})}
    (folder / "run.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def stale_joins(results: Path = RESULTS) -> list[str]:
    """``"results/NAME: ..."`` for every joined run whose cells (cell keys and scores) are no longer those
    of its parts, or that names a part no longer committed (empty: every join is current)."""
    import pandas as pd

    out, cols = [], ["cell_key", "wa", "ua", "wf1"]
    runs = committed_runs(results)
    for name, run in runs.items():
        parts = [p["name"] for p in run.meta.get("parts", [])]
        if not parts:
            continue
        missing = [p for p in parts if p not in runs]
        if missing:
            out.append(f"results/{name}: joins results/{missing[0]}, which is not a committed run")
            continue
        theirs = pd.concat([_rows(runs[p])[cols] for p in parts]).sort_values("cell_key", ignore_index=True)
        if not theirs.equals(_rows(run)[cols].sort_values("cell_key", ignore_index=True)):
            out.append(f"results/{name}: its parts' cells changed (join again: python -m benchbench.tools.publish "
                       f"join {name} {' '.join(parts)})")
    return out


class CommittedRun:
    """One ``results/<name>/`` folder, read lazily (``FileNotFoundError`` naming the missing file)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.name = self.folder.name
        path = self.folder / "run.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (record it: python -m benchbench.tools.publish record "
                                    f"{self.name} -- bench ...)")
        self.meta = json.loads(path.read_text())

    @property
    def stdout(self) -> str:
        return (self.folder / "stdout.txt").read_text()

    @cached_property
    def summary(self):
        from benchbench.analysis import Summary

        return Summary.read(self.folder / "summary.json")


def committed_runs(results: Path = RESULTS) -> dict[str, CommittedRun]:
    """Every committed run under ``results/``, by name."""
    return {p.name: CommittedRun(p) for p in sorted(results.iterdir()) if (p / "run.json").is_file()} \
        if results.is_dir() else {}


# ---------------------------------------------------------------------------- views
def _minutes(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m} min {s:02d} s" if m else f"{s} s"


def view_terminal(run: CommittedRun) -> str:
    text = PROGRESS_LINE.sub("", PRIVATE_LINE.sub("", run.stdout)).rstrip("\n")
    return "```\n" + re.sub(r"\n{3,}", "\n\n", text) + "\n```"


def view_command(run: CommittedRun) -> str:
    return "```\n" + run.meta["command"] + "\n```"


def view_provenance(run: CommittedRun) -> str:
    m, mach = run.meta, run.meta["machine"]
    attempts = len(m["attempts"])
    first, *more = m["command"].splitlines()
    gpu = f"{mach['gpu']} ({mach['gpu_memory_gb']} GiB), " if mach.get("gpu") else ""
    kernels = f" (bf16 kernels: {mach['bf16_kernels']})" if mach.get("bf16_kernels") else ""
    if m.get("parts"):  # a joined run: its parts, their commands and commits (the same code)
        commits = sorted({p["commit"][:10] for p in m["parts"]})
        names = ", ".join(f"`results/{p['name']}`" for p in m["parts"])
        accepted = m.get("accepted_code_differences") or []
        same = ("the same code" if not accepted else "the same code but " + "; ".join(
            f"`{a['path']}`, accepted at the join: {a['reason']}" for a in accepted))
        head = (f", joined from {names}: {1 + len(more)} commands on commit{'s' if len(commits) > 1 else ''} "
                f"{', '.join(f'`{c}`' for c in commits)}{_dirty_text(m)} ({same})")
    else:
        command = f"`{first}`" + (f" and {len(more)} more command{'s' if len(more) > 1 else ''}" if more else "")
        head = f": {command} on commit `{m['commit'][:10]}`{_dirty_text(m)}"
    versions = m.get("versions") or {}  # runs recorded before run.json held them name torch alone
    packages = "".join(f", {k} {versions[k]}" for k in PROVENANCE_PACKAGES if k in versions)
    return (f"*Committed run `results/{run.name}`{head}, version {m['version']}; {gpu}{mach['cpu']}, "
            f"{mach['cores']} logical cores{kernels}, torch {mach['torch']}{packages}; wall time "
            f"{_minutes(m['wall_seconds'])}{f' over {attempts} attempts' if attempts > 1 else ''}.*")


PROVENANCE_PACKAGES = ("transformers", "peft", "titans-pytorch", "numpy", "pandas", "scikit-learn", "scipy",
                       "statsmodels", "mlflow", "optuna")
"""The packages whose versions the provenance line names beside torch (``run.json``'s ``versions``)."""


def _dirty_text(meta: dict) -> str:
    """`` (uncommitted changes to a, b)`` for a run recorded on a dirty tree (the paths where ``run.json``
    names them: runs recorded before it did say only that there were changes); ``""`` for a clean one."""
    if not meta["dirty"]:
        return ""
    paths = meta.get("dirty_paths") or []
    shown = ", ".join(f"`{p}`" for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return f" (uncommitted changes to {shown})" if paths else " (uncommitted changes)"


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def _ci(s: dict) -> str:
    import math

    if not math.isfinite(s.get("ci_low", float("nan"))):
        return _pct(s["mean"])
    return f"{_pct(s['mean'])} [{_pct(s['ci_low'])}, {_pct(s['ci_high'])}]"


def _sections(run: CommittedRun):
    """(task, backbone) -> the CellSummary list, in the summary's order."""
    out: dict[tuple, list] = {}
    for c in run.summary.cells:
        out.setdefault((c.task, c.backbone), []).append(c)
    return out


def view_table(run: CommittedRun, reference: str = "lora") -> str:
    from benchbench.analysis import gap_target_text, gap_text

    s = run.summary
    comps = {(c["task"], c["backbone"], c["method"]): c for c in s.comparisons if c["reference"] == reference}
    gaps = {(g["task"], g["backbone"], g["method"]): g for g in s.gap_closed if g["reference"] == reference}
    parts = []
    secs = _sections(run)
    for (task, backbone), cells in secs.items():
        targets = {gap_target_text(g) for k, g in gaps.items() if k[:2] == (task, backbone)}
        gap_head = f"gap closed ({reference} -> {targets.pop()})" if len(targets) == 1 else "gap closed"
        if len(secs) > 1:
            parts.append(f"**{task} · {backbone}**\n")
        head = ["method", "n (seeds x folds)", "WA", "UA", "WF1", f"WA - {reference} (Holm p)", gap_head]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in cells:
            comp = comps.get((task, backbone, c.method))
            delta = ""
            if comp is not None:
                b, p = comp["bootstrap"]["wa"], comp["dialogues"].get("wilcoxon_p_holm")
                delta = f"{100 * b['diff']:+.2f} [{100 * b['ci_low']:+.2f}, {100 * b['ci_high']:+.2f}]" + \
                    (f" (p {p:.2g})" if p is not None else "")
            gap = gaps.get((task, backbone, c.method))
            lines.append("| " + " | ".join([
                f"`{c.method}`", f"{c.n} ({len(c.seeds)} x {len(c.folds)})",
                *(_ci(c.stats[m]) if m in c.stats else "–" for m in ("wa", "ua", "wf1")),
                delta, gap_text(gap) if gap else ""]) + " |")
        parts.append("\n".join(lines))
        refs = [r for r in s.context_references if (r["task"], r["backbone"]) == (task, backbone)]
        for r in refs:
            parts.append(f"Reference `label_history` (lora + the speaker's previous *gold* label, which no method "
                         f"sees; a reference, not a bound): {_pct(r['wa'])} WA.")
    return "\n\n".join(parts)


def view_verdicts(run: CommittedRun, reference: str = "lora") -> str:
    """Per task x backbone, each method's WA and its difference from ``reference`` split into the part
    from the dialogue (the method against its own history-free control) and from capacity (the control
    against ``reference``), the share of the gap to the context reference closed by the dialogue, the
    slope over the speaker's earlier utterances, the Holm p of the declared family and the verdict
    (``summary.json``'s ``decomposition``, :func:`benchbench.analysis.decompose`)."""
    import numpy as np

    from benchbench.analysis import diff_text, gap_target_text, gap_text, strength_text

    s = run.summary
    dec = {(d["task"], d["backbone"], d["method"]): d for d in s.decomposition if d["reference"] == reference}
    if not dec:
        return "No history-free controls in this run (a run of an older suite): see its `table` view."
    gaps = {(g["task"], g["backbone"], g["method"]): g for g in s.gap_closed if g["reference"] == reference}
    parts = []
    secs = _sections(run)
    for (task, backbone), cells in secs.items():
        mine = {k[2]: d for k, d in dec.items() if k[:2] == (task, backbone)}
        if not mine:
            continue
        targets = {gap_target_text(g) for k, g in gaps.items() if k[:2] == (task, backbone)}
        gap_head = f"gap closed by the dialogue ({reference} -> {targets.pop()})" if len(targets) == 1 else \
            "gap closed by the dialogue"
        if len(secs) > 1:
            parts.append(f"**{task} · {backbone}**\n")
        head = ["method", "WA", f"total vs {reference}", "from the dialogue", "capacity", gap_head,
                "slope / earlier utterance", "Holm p", "verdict"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in cells:
            d = mine.get(c.method)
            if d is None:
                if c.method == reference:
                    lines.append(f"| `{c.method}` | {_ci(c.stats['wa'])} | reference |  |  |  |  |  |  |")
                continue
            gap, slope, p = gaps.get((task, backbone, c.method)), d.get("history_slope"), d.get("holm_p")
            lines.append("| " + " | ".join([
                f"`{c.method}`", _ci(c.stats["wa"]), diff_text(d["total"]["wa"]),
                diff_text(d["dialogue"]["wa"]) if d["dialogue"] else "no control",
                diff_text(d["capacity"]["wa"]) if d["capacity"] else "",
                gap_text(gap) if gap and gap.get("numerator") == "dialogue" else "",
                diff_text({k: slope[k if k != "diff" else "slope"] for k in ("diff", "ci_low", "ci_high")})
                if slope and np.isfinite(slope["slope"]) else "",
                f"{p:.2g}" if p is not None else "", f"**{d['verdict']}**"]) + " |")
        parts.append("\n".join(lines))
        any_d = next(iter(mine.values()))
        fam = any_d.get("family") or {}
        n_dlg, n_folds = any_d["total"]["wa"]["n_dialogues"], any_d["total"]["wa"]["n_folds"]
        parts.append(
            f"Differences in WA points: the mean over seed x fold cells (so WA - {reference}'s WA = total = from the "
            f"dialogue + capacity), with 95% intervals from a bootstrap over the {n_dlg} test dialogues resampled "
            f"within {'each of the ' + str(n_folds) + ' folds' if n_folds > 1 else 'the fold'} (seeds averaged "
            "within a dialogue). *From the dialogue*: the method minus "
            "its own history-free control (the same fitted model, its state reset before every test utterance); "
            f"*capacity*: that control minus `{reference}`. Slope: the WA difference per earlier utterance of the "
            "speaker (0, 1, 2, 3+). Holm p: Wilcoxon signed-rank over test dialogues, family: "
            f"{fam.get('name', '')} ({fam.get('size', '?')} comparisons). Verdict: the rule of docs/statistics.md "
            "(\"Verdicts\").")
        trained = [f"`{m}` - `{d['trained_control']['control']}` {diff_text(d['trained_control']['difference']['wa'])}"
                   for m, d in mine.items() if d.get("trained_control")]
        if trained:
            parts.append("What the history adds against the same memory *trained* without it (the capacity control "
                         "`{history=false}`: reset before every utterance in training and evaluation; WA points, "
                         "the same intervals): " + "; ".join(trained) + ".")
        folds = [f"`{m}` [{100 * d['total']['wa']['fold_ci_low']:+.2f}, {100 * d['total']['wa']['fold_ci_high']:+.2f}]"
                 for m, d in mine.items() if np.isfinite(d["total"]["wa"]["fold_ci_low"])]
        if folds and n_folds >= 5:
            parts.append(f"Total vs `{reference}`, 95% t-interval over the {n_folds} folds (the independent speaker "
                         "groups): " + ", ".join(folds) + ".")
        refs = [r for r in s.context_references if (r["task"], r["backbone"]) == (task, backbone)]
        for r in refs:
            parts.append(f"Reference `label_history` (`{reference}` + the speaker's previous *gold* label, which no "
                         f"method sees; {strength_text(r)}; a reference, not a bound): {_pct(r['wa'])} WA.")
    return "\n\n".join(parts)


def view_gate(run: CommittedRun) -> str:
    """The phase gate audited (``summary.json``'s ``phase_gate``, :func:`benchbench.analysis.phase_gate_audit`):
    per two-stage method, always Phase 2 (the papers' protocol) against the gated result, how often the
    gate keeps Phase 2, and how often it picks the phase that is better on test."""
    from benchbench.analysis import diff_text

    rows = run.summary.phase_gate
    if not rows:
        return "No two-stage method in this run saved both phases' test predictions."
    several = len({(g["task"], g["backbone"]) for g in rows}) > 1
    head = ["method", f"always Phase 2 vs {rows[0]['reference']}", "gated vs " + rows[0]["reference"],
            "gate keeps Phase 2", "gate picks the phase better on test", "p (above chance)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in rows:
        lines.append("| " + " | ".join([
            f"`{g['method']}`" + (f" ({g['task']} · {g['backbone']})" if several else ""),
            diff_text(g["always_phase2"]), diff_text(g["gated"]), f"{g['kept']}/{g['n']} cells",
            f"{g['hits']}/{g['decisive']} cells where the phases differ", f"{g['p_above_chance']:.2g}"]) + " |")
    hits, dec = sum(g["hits"] for g in rows), sum(g["decisive"] for g in rows)
    return "\n".join(lines) + (
        f"\n\nOver every method: the gate picks the better phase in {hits}/{dec} decisive cells "
        f"({100 * hits / dec:.0f}%; chance is 50%). The gate keeps Phase 2 where its dev-best epoch beats Phase 1 "
        "on the dev split; WA points, mean over cells, 95% bootstrap over test dialogues within folds."
        if dec else "")


def view_dev_choices(run: CommittedRun) -> str:
    """How many models each method's dev split compared per cell: the dev scores of its training curves
    (``curves.csv.gz``: one per epoch of every stage, one per ``hmm`` strength) and, for a tuned cell,
    its Optuna trials on the same dev split (``results.csv``'s ``tuning_trials``; each trial compares its
    own epochs again)."""
    import pandas as pd

    path = run.folder / "curves.csv.gz"
    if not path.is_file():
        return "This run kept no training curves."
    curves = pd.read_csv(path)
    dev = curves[curves["curve"].str.contains("_dev_")]
    per_cell = dev.groupby(["method", "seed", "fold"], sort=False).size().groupby("method", sort=False).agg(["min", "max"])
    rows = _rows(run)
    trials = rows.groupby("method", sort=False)["tuning_trials"].max() if "tuning_trials" in rows else {}
    lines = ["| method | dev scores per fit (epochs, strengths) | tuning trials per fold (seed 0) |", "|---|---|---|"]
    for m, r in per_cell.iterrows():
        span = f"{r['min']}" if r["min"] == r["max"] else f"{r['min']}-{r['max']}"
        lines.append(f"| `{m}` | {span} | {int(trials.get(m, 0)) if len(trials) else 0} |")
    return "\n".join(lines)


def _replayed(run: CommittedRun) -> dict[tuple, str]:
    """(task, backbone, method) -> ``"k/n"``: in how many of its cells the task LoRA's training was
    replayed (``results.csv``'s ``phase1_replayed``), for methods that have a Phase 1."""
    import pandas as pd

    path = run.folder / "results.csv"
    if not path.is_file():
        return {}
    rows = pd.read_csv(path)
    if "phase1_replayed" not in rows:
        return {}
    out = {}
    for key, g in rows.groupby(["task", "backbone", "method"], sort=False):
        flags = g["phase1_replayed"].astype(str)
        if flags.isin(["True", "False"]).any():
            out[key] = f"{int((flags == 'True').sum())}/{len(g)}"
    return out


def view_costs(run: CommittedRun) -> str:
    parts = []
    secs = _sections(run)
    replayed = _replayed(run)
    for (task, backbone), cells in secs.items():
        if len(secs) > 1:
            parts.append(f"**{task} · {backbone}**\n")
        head = ["method", "fit s / cell", "Phase 1 replayed", "ms / utterance", "of which test-time training",
                "trained parameters", "peak RSS MiB"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for c in cells:
            st = c.stats

            def mean(k, fmt):
                return fmt.format(st[k]["mean"]) if k in st else ""
            lines.append("| " + " | ".join([
                f"`{c.method}`", mean("fit_seconds", "{:.1f}"), replayed.get((task, backbone, c.method), ""),
                mean("eval_ms_per_utterance", "{:.1f}"), mean("test_time_update_ms_per_utterance", "{:.1f}"),
                mean("trained_parameters", "{:,.0f}"), mean("peak_rss_mb", "{:.0f}")]) + " |")
        parts.append("\n".join(lines))
    if any(v.split("/")[0] != "0" for v in replayed.values()):
        parts.append("Fit seconds are what each cell trained itself: where its task LoRA's training was replayed "
                     "(the identical training of another cell, or of another run through the on-disk Phase-1 "
                     "cache), that training is not in them.")
    return "\n\n".join(parts)


def view_selection(run: CommittedRun) -> str:
    if run.summary.phase_gate and all(c.selection.get("phase_2") == c.selection.get("n")
                                      for c in run.summary.cells if c.selection):
        return ("The phase gate is off (the papers' protocol): every two-stage cell reports Phase 2, and its Phase-1 "
                "predictions are kept beside; the gate's audit is the `gate` view.")
    cells = [c for c in run.summary.cells if c.selection]
    several = len({(c.task, c.backbone) for c in cells}) > 1  # then each count names its task and backbone
    rows = [f"`{c.method}`" + (f" ({c.task} · {c.backbone})" if several else "") +
            f" {c.selection['phase_2']}/{c.selection['n']}" for c in cells]
    return ("Cells whose dev selection kept Phase 2 (else the memory was dropped and the cell predicts as `lora`): "
            + ", ".join(rows) + ".") if rows else "No two-stage method in this run."


def view_history(run: CommittedRun) -> str:
    """WA (%) by how many earlier utterances of the same speaker the dialogue holds (0, 1, 2, 3+), per
    method over every test utterance of every cell (``summary.json``'s ``by_speaker_history``), with the
    utterances in each bin: a memory of the speaker's history should rise along the row where ``lora``
    stays flat."""
    parts = []
    hist = run.summary.by_speaker_history
    secs = {}
    for h in hist:
        secs.setdefault((h["task"], h["backbone"]), []).append(h)
    for (task, backbone), rows in secs.items():
        if len(secs) > 1:
            parts.append(f"**{task} · {backbone}**\n")
        bins = list(rows[0]["wa"])
        slopes = {d["method"]: d["history_slope"] for d in run.summary.decomposition
                  if (d["task"], d["backbone"]) == (task, backbone) and d.get("history_slope")}
        ref = next((d["reference"] for d in run.summary.decomposition), "lora")
        head = ["method", *(f"{b} earlier (n {rows[0]['n'][b]})" for b in bins),
                *([f"slope of the difference to {ref} (pts / earlier utterance)"] if slopes else [])]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for h in rows:
            sl = slopes.get(h["method"])
            slope = [f"{100 * sl['slope']:+.2f} [{100 * sl['ci_low']:+.2f}, {100 * sl['ci_high']:+.2f}]"
                     if sl and sl["ci_low"] == sl["ci_low"] else ""] if slopes else []
            lines.append("| " + " | ".join([f"`{h['method']}`", *(f"{100 * h['wa'][b]:.1f}" for b in bins), *slope])
                         + " |")
        parts.append("\n".join(lines))
    if parts and any(d.get("history_slope") for d in run.summary.decomposition):
        parts.append("Slope: least squares of the per-utterance WA difference on the speaker's earlier utterances "
                     "(0, 1, 2, 3+), 95% bootstrap over test dialogues within folds: a memory of the speaker rises, "
                     "capacity on the current utterance stays flat.")
    return "\n\n".join(parts) if parts else "No per-utterance predictions in this run."


def _base(label: str) -> str:
    """A results label's method name: ``mal[speaker,m0-surprise]{d_m=32}`` -> ``mal``."""
    return re.split(r"[\[{]", label, maxsplit=1)[0]


def view_forms(run: CommittedRun, reference: str = "lora") -> str:
    """A run whose commands added a method's other forms to the same folder (several ``bench run`` into
    one committed run), read from ``results.csv`` (every cell of every command) and the closing
    ``bench compare --all-pairs`` (``comparisons.json``): per form, its cells, mean WA, its WA difference
    to ``reference`` with the 95% dialogue-bootstrap interval and the Holm-corrected Wilcoxon p over
    dialogues, mean fit seconds and inference ms per utterance; then every pair of forms of one method
    (``mal[speaker]`` vs ``mal[speaker,m0-surprise]``) compared the same way, with McNemar over
    utterances. Holm corrects over every pair the command compared."""
    rows = _rows(run)
    comps = json.loads((run.folder / "comparisons.json").read_text())
    pair = {(c["task"], c["method"], c["reference"]): c for c in comps}

    def diff(c: dict | None, sign: int = 1) -> tuple[str, str]:
        if c is None:
            return "", ""
        b = c["bootstrap"]["wa"]
        lo, hi = sorted((sign * b["ci_low"], sign * b["ci_high"]))
        return (f"{100 * sign * b['diff']:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]",
                f"{c['dialogues']['wilcoxon_p_holm']:.2g}")

    lines = [f"| task | method | cells | WA | WA - {reference} [95% CI] | Holm p | fit s | ms/utt |",
             "|---|---|---|---|---|---|---|---|"]
    for (task, method), g in rows.groupby(["task", "method"], sort=False):
        c = pair.get((task, method, reference))
        d, p_ = diff(c) if c else diff(pair.get((task, reference, method)), -1)
        lines.append(f"| {task} | `{method}` | {len(g)} | {100 * g['wa'].mean():.2f} | {d} | {p_} | "
                     f"{g['fit_seconds'].mean():.1f} | {g['eval_ms_per_utterance'].mean():.2f} |")
    lines += ["", "| task | form | other form | WA difference [95% CI] | Wilcoxon over dialogues (Holm p) | "
                  "McNemar (Holm p) | dialogues |", "|---|---|---|---|---|---|---|"]
    for c in comps:
        if _base(c["method"]) == _base(c["reference"]):
            d, p_ = diff(c)
            lines.append(f"| {c['task']} | `{c['method']}` | `{c['reference']}` | {d} | {p_} | "
                         f"{c['mcnemar']['p_value_holm']:.2g} | {c['n_dialogues']} |")
    return "\n".join(lines)


def view_paper_scale(run: CommittedRun) -> str:
    """A ``python -m benchbench.tools.paper_scale`` run (one folder per backbone, each with
    ``paper_scale.csv`` and ``machine.json``): per backbone and method, seconds per epoch (and the
    training utterances an epoch holds), inference ms per utterance, peak CUDA memory and trained
    parameters; a method the run asked for with no row is "not measured" (the run was cut short), a
    failed one shows its error; a two-stage cell whose dev selection kept Phase 1 says so beside its
    inference time (it streamed without its memory or context: ``lora``'s path)."""
    import pandas as pd

    lines = ["| backbone | method | fit s / epoch | training utterances | inference ms / utterance | peak CUDA GiB | "
             "trained parameters |", "|---|---|---|---|---|---|---|"]
    # which two-stage cells dev sent back to Phase 1 (their inference is lora's path): the table's
    # selected_phase where the run recorded it, else the NOTICE lines of its output, per backbone section
    kept_phase1, section = set(), None
    for line in run.stdout.splitlines():
        m = re.match(r"^\$ python -m benchbench\.tools\.paper_scale --backbone (\S+)", line)
        section = m.group(1) if m else section
        m = re.match(r"^  \[(\w+)\] NOTICE: dev selected Phase 1", line)
        if m:
            kept_phase1.add((section, m.group(1)))
    for folder in sorted(p for p in run.folder.iterdir() if (p / "paper_scale.csv").is_file()):
        info = json.loads((folder / "machine.json").read_text())
        table = pd.read_csv(folder / "paper_scale.csv").set_index("method")
        if "selected_phase" in table:
            kept_phase1 |= {(folder.name, m) for m in table.index[table["selected_phase"] == 1]}
        head = f"{info['backbone']} ({info['parameters'] / 1e9:.2f}B, {info['dtype']})"
        for method in info["methods"]:
            if method not in table.index:
                lines.append(f"| {head} | {method} | not measured: the run was cut by its time limit | | | | |")
            elif table.loc[method, "status"] != "ok":
                lines.append(f"| {head} | {method} | failed: {table.loc[method, 'error']} | | | | |")
            else:
                r = table.loc[method]
                phase1 = " (dev kept Phase 1: lora's path)" if (folder.name, method) in kept_phase1 else ""
                lines.append(f"| {head} | {method} | {r['fit_seconds_per_epoch']:.1f} | {int(r['train_utterances'])} | "
                             f"{r['eval_ms_per_utterance']:.1f}{phase1} | {r['peak_cuda_mb'] / 1024:.1f} | "
                             f"{r['trained_parameters'] / 1e6:.1f}M |")
            head = ""
    return "\n".join(lines)


def _rows(run: CommittedRun):
    """The run's finished cells (``results.csv`` rows with status ``ok``; cell keys as text)."""
    import pandas as pd

    rows = pd.read_csv(run.folder / "results.csv", dtype={"cell_key": str})
    return rows[rows["status"] == "ok"]


def view_folds(run: CommittedRun) -> str:
    """Per method and fold, the test WA (%, the mean over the run's seeds) and the fit seconds of a
    cell (what it trained itself: a replayed Phase 1 is not in them), then their means over folds:
    where two runs of one method differ (before and after a change of its training), fold by fold."""
    parts = []
    rows = _rows(run)
    secs = list(rows.groupby(["task", "backbone"], sort=False))
    for (task, backbone), g in secs:
        if len(secs) > 1:
            parts.append(f"**{task} · {backbone}**\n")
        folds = sorted(g["fold"].unique())
        head = ["method", *(f"fold {f}: WA · fit s" for f in folds), "mean: WA · fit s"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for method, m in g.groupby("method", sort=False):
            by = m.groupby("fold")[["wa", "fit_seconds"]].mean()
            cells = [f"{100 * by.loc[f, 'wa']:.2f} · {by.loc[f, 'fit_seconds']:.0f}" if f in by.index else ""
                     for f in folds]
            lines.append("| " + " | ".join([f"`{method}`", *cells,
                                            f"{100 * m['wa'].mean():.2f} · {m['fit_seconds'].mean():.0f}"]) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def view_probe(run: CommittedRun) -> str:
    """A ``bench probe`` run's ``probe.csv`` (:mod:`benchbench.probe`): per task, backbone and features
    (the audio features, or the trainable projector's output at its initialisation and after lora's
    training), a row: the feature width, the seeds, per fold test WA and UA in % (the mean over the
    seeds), the mean over every row, and the C chosen on dev (each fold's with one seed, the range
    otherwise). A ``probe.csv`` written before the ``features`` and ``seed`` columns is the audio
    features'. ``FileNotFoundError`` naming the file when the run holds none."""
    import pandas as pd

    from ..probe import FEATURES

    path = run.folder / "probe.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no probe.csv (the view is for a recorded `bench probe` command)")
    rows = pd.read_csv(path)
    rows["features"] = rows["features"].fillna("audio") if "features" in rows else "audio"
    if "seed" not in rows:
        rows["seed"] = float("nan")
    folds = sorted(rows["fold"].unique())
    lines = ["| task · backbone | features | width | seeds | " + " | ".join(f"fold {f}: WA · UA" for f in folds)
             + " | mean: WA · UA | C chosen on dev |", "|" + "---|" * (len(folds) + 6)]
    for (task, backbone, features), g in rows.groupby(["task", "backbone", "features"], sort=False):
        by = g.groupby("fold")[["wa", "ua"]].mean()
        cells = [f"{100 * by.loc[f, 'wa']:.2f} · {100 * by.loc[f, 'ua']:.2f}" if f in by.index else "" for f in folds]
        seeds = sorted(int(x) for x in g["seed"].dropna().unique())
        C = (" ".join(f"{c:g}" for c in g["C"]) if len(seeds) <= 1
             else f"{g['C'].min():g} to {g['C'].max():g}")
        lines.append(f"| {task} · `{backbone}` | {FEATURES.get(features, features)} | {int(g['feature_dim'].iloc[0])} | "
                     + (",".join(map(str, seeds)) or "–") + " | " + " | ".join(cells)
                     + f" | {100 * g['wa'].mean():.2f} · {100 * g['ua'].mean():.2f} | {C} |")
    return "\n".join(lines)


PHASE1_STAGES = ("align", "lora")
"""The curve prefixes of Phase 1's stages (:func:`benchbench.training.fit_task_lora`)."""


def view_curves(run: CommittedRun) -> str:
    """Every training stage of every cell that trained one (``curves.csv.gz``, kept by ``record``):
    per cell and stage (``align``: the projector alone; ``lora``: the task LoRA, Phase 1; a method's
    own Phase 2), the dev score and the mean training loss per epoch, and the stage's best dev epoch
    (the first of a tie; whether a two-stage cell kept its Phase 2 at all is the ``selection`` view's).
    A Phase 1 (stages ``align`` and ``lora``) that a cell replayed from another is not repeated: its cell
    of origin shows it."""
    import pandas as pd

    path = run.folder / "curves.csv.gz"
    if not path.is_file():
        return "No curves in this run (recorded before `record` kept them)."
    curves = pd.read_csv(path)
    parts = []
    secs = list(curves.groupby(["task", "backbone"], sort=False))
    for (task, backbone), g in secs:
        if len(secs) > 1:
            parts.append(f"**{task} · {backbone}**\n")
        lines = ["| method | seed · fold | stage | dev score by epoch (%) | training loss by epoch | best dev epoch |",
                 "|---|---|---|---|---|---|"]
        for (method, seed, fold), cell in g.groupby(["method", "seed", "fold"], sort=False):
            names = list(dict.fromkeys(cell["curve"]))
            for dev in [n for n in names if re.fullmatch(r"\w+?_dev_\w+", n) and "_train_" not in n]:
                stage, metric = re.fullmatch(r"(\w+?)_dev_(\w+)", dev).groups()
                if stage in PHASE1_STAGES and bool(cell["phase1_replayed"].iloc[0]):
                    continue
                d = cell[cell["curve"] == dev].sort_values("step")["value"].tolist()
                steps = cell[cell["curve"] == f"{stage}_train_loss"].sort_values("step")["value"].tolist()
                # the training loss is logged per optimiser step: its mean over each epoch's steps
                per = len(steps) // len(d) if d and len(steps) % len(d) == 0 else 0
                loss = [sum(steps[i * per:(i + 1) * per]) / per for i in range(len(d))] if per else []
                best = max(range(len(d)), key=lambda i: (d[i], -i)) + 1 if d else ""
                lines.append(f"| `{method}` | {seed} · {fold} | {stage} ({metric}) | "
                             f"{' '.join(f'{100 * v:.1f}' for v in d)} | {' '.join(f'{v:.2f}' for v in loss)} | {best} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


VIEWS = {"terminal": view_terminal, "command": view_command, "provenance": view_provenance, "table": view_table,
         "costs": view_costs, "selection": view_selection, "paper-scale": view_paper_scale,
         "forms": view_forms, "history": view_history, "folds": view_folds, "curves": view_curves,
         "probe": view_probe, "verdicts": view_verdicts, "gate": view_gate,
         "dev-choices": view_dev_choices}


# ---------------------------------------------------------------------------- render and check
def documents(root: Path = ROOT) -> list[Path]:
    """The Markdown files the generator renders into: README.md and every page under docs/."""
    out = []
    for d in DOCUMENTS:
        p = root / d
        out += sorted(p.rglob("*.md")) if p.is_dir() else ([p] if p.is_file() else [])
    return out


def render_text(text: str, runs: dict[str, CommittedRun], where: str = "") -> str:
    """``text`` with every generated block re-rendered. Raises ``ValueError`` naming the file (``where``),
    the run or the view when a block names a run that is not committed or a view that does not exist."""
    def one(m: re.Match) -> str:
        name, view = m.group("name"), m.group("view")
        if name not in runs:
            raise ValueError(f"{where}: block names results/{name}, which is not a committed run "
                             f"(known: {', '.join(runs) or 'none'})")
        if view not in VIEWS:
            raise ValueError(f"{where}: block for results/{name} asks for view {view!r} (known: {', '.join(VIEWS)})")
        return m.group(1) + VIEWS[view](runs[name]).rstrip("\n") + "\n" + m.group(5)

    return BLOCK.sub(one, text)


def stale(root: Path = ROOT, results: Path = RESULTS) -> list[str]:
    """``"FILE: results/NAME VIEW"`` for every block that differs from what the generator makes of the
    committed runs, after :func:`stale_joins`' lines for joined runs whose parts changed (empty: every
    document and every join is current)."""
    runs, out = committed_runs(results), stale_joins(results)
    for path in documents(root):
        text = path.read_text()
        new = render_text(text, runs, str(path.relative_to(root)))
        if new != text:
            old_blocks = {(m.group("name"), m.group("view"), m.group("body")) for m in BLOCK.finditer(text)}
            for m in BLOCK.finditer(new):
                if (m.group("name"), m.group("view"), m.group("body")) not in old_blocks:
                    out.append(f"{path.relative_to(root)}: results/{m.group('name')} {m.group('view')}")
    return out


def render(root: Path = ROOT, results: Path = RESULTS) -> list[Path]:
    """Rewrite every generated block of the documents in place; returns the files that changed."""
    runs, changed = committed_runs(results), []
    for path in documents(root):
        text = path.read_text()
        new = render_text(text, runs, str(path.relative_to(root)))
        if new != text:
            path.write_text(new)
            changed.append(path)
    return changed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchbench.tools.publish", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = sub.add_parser("record", help="run a bench command and keep it in results/NAME")
    r.add_argument("name")
    r.add_argument("command", nargs=argparse.REMAINDER, help="-- bench run ...")
    j = sub.add_parser("join", help="make results/NAME of several committed runs (parts: one machine, one code)")
    j.add_argument("name")
    j.add_argument("parts", nargs="+", help="committed runs under results/")
    j.add_argument("--accept", action="append", default=[], metavar="PATH=REASON",
                   help="a code path whose difference between the parts' commits you read and found not to "
                        "change what the cells compute, and why (kept in run.json and the provenance line)")
    sub.add_parser("render", help="rewrite every generated block of README.md and docs/")
    sub.add_parser("check", help="exit 1 naming each generated block that is not current")
    args = p.parse_args(argv)
    try:
        if args.what == "record":
            command = args.command[1:] if args.command[:1] == ["--"] else args.command
            return record(args.name, command)
        if args.what == "join":
            bad = [a for a in args.accept if "=" not in a or not a.split("=", 1)[1].strip()]
            if bad:
                raise ValueError(f"--accept {bad[0]}: give PATH=REASON")
            accept = dict(a.split("=", 1) for a in args.accept)
            print(f"joined {join(args.name, args.parts, accept=accept).relative_to(ROOT)}")
            return 0
        if args.what == "render":
            for path in render():
                print(f"rendered {path.relative_to(ROOT)}")
            return 0
        out = stale()
        for line in out:
            print(f"stale: {line}")
        if out:
            print("run: python -m benchbench.tools.publish render")
        return 1 if out else 0
    except (ValueError, FileNotFoundError) as e:
        print(f"publish: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
