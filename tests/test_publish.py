"""Every published number comes from a committed run: the README's and the docs' generated blocks are
what the generator makes of results/ (a stale block fails here), and the recorder keeps what a command
printed with its command, commit and machine."""

import json
import shutil
import subprocess

import pandas as pd
import pytest

from benchbench.tools import publish
from benchbench.tools.publish import ROOT, CommittedRun, committed_runs, render, render_text, stale


def test_every_generated_block_of_the_readme_and_the_docs_is_current():
    """The guard: a changed result must be regenerated (`python -m benchbench.tools.publish render`),
    never edited by hand."""
    assert stale() == []
    docs = [p.relative_to(ROOT).as_posix() for p in publish.documents()]
    assert "README.md" in docs and "docs/results.md" in docs
    readme = (ROOT / "README.md").read_text()
    assert readme.count("<!-- results:main-job-v3 terminal -->") == 1  # the main job's output, once
    assert len(readme.splitlines()) <= 250


def test_the_documents_speak_in_the_present():
    """History goes to CHANGELOG.md: no sentence of the README or the docs describes a release."""
    for path in publish.documents():
        text = path.read_text().lower()
        for phrase in ("previous release", "this release", "the release before", "earlier releases"):
            assert phrase not in text, f"{path}: {phrase!r}"


def test_a_block_edited_by_hand_is_stale_and_render_restores_it(tmp_path):
    (tmp_path / "docs").mkdir()
    doc = tmp_path / "docs" / "page.md"
    runs = committed_runs()
    doc.write_text("intro\n<!-- results:main-job table -->\n<!-- /results -->\nend\n")
    assert stale(tmp_path) == ["docs/page.md: results/main-job table"]
    assert render(tmp_path) == [doc]
    good = doc.read_text()
    assert stale(tmp_path) == [] and good.startswith("intro\n") and good.endswith("<!-- /results -->\nend\n")
    lora = next(c for c in runs["main-job"].summary.cells if c.method == "lora")
    assert f"| `lora` | {lora.n} (3 x 1) | {100 * lora.stats['wa']['mean']:.2f} [" in good
    doc.write_text(good.replace(f"{100 * lora.stats['wa']['mean']:.2f}", "99.99"))  # a hand edit
    assert stale(tmp_path) == ["docs/page.md: results/main-job table"]


def test_a_block_naming_an_unknown_run_or_view_says_which():
    runs = committed_runs()
    with pytest.raises(ValueError, match="README.md: block names results/nope, which is not a committed run"):
        render_text("<!-- results:nope table -->\n<!-- /results -->", runs, "README.md")
    with pytest.raises(ValueError, match="asks for view 'bogus'"):
        render_text("<!-- results:main-job bogus -->\n<!-- /results -->", runs, "x.md")


def test_the_views_say_what_the_committed_run_holds():
    run = committed_runs()["main-job"]
    meta = run.meta
    assert meta["command"] == "bench run --methods zero_shot,lora,full_context,mal --tasks synthetic"
    assert len(meta["commit"]) == 40 and meta["machine"]["cores"] >= 1 and meta["wall_seconds"] > 0
    # the commit is a real commit of this repository
    assert subprocess.run(["git", "cat-file", "-e", meta["commit"]], cwd=ROOT).returncode == 0
    terminal = publish.view_terminal(run)
    assert "full_context[speaker]" in terminal and "results: " not in terminal and "epoch 1/6" not in terminal
    prov = publish.view_provenance(run)
    assert meta["commit"][:10] in prov and meta["machine"]["cpu"] in prov
    table = publish.view_table(run)
    assert "gap closed (lora -> Bayes ceiling speaker_history 80.52)" in table  # the target, with its value
    assert "Reference `label_history`" in table and "a reference, not a bound" in table
    costs = publish.view_costs(run)
    import pandas as pd

    rows = pd.read_csv(run.folder / "results.csv")
    mal = rows[rows.method == "mal[speaker]"]
    replayed = f"{int((mal.phase1_replayed.astype(str) == 'True').sum())}/{len(mal)}"
    assert "| Phase 1 replayed |" in costs and f"| `mal[speaker]` | {mal.fit_seconds.mean():.1f} | {replayed} |" in costs
    history = publish.view_history(run).splitlines()
    # one row per method, the bins with their utterance counts, the values the run printed
    assert history[0].startswith("| method | 0 earlier (n ") and "| 3+ earlier (n " in history[0]
    assert len(history) == 2 + 4
    mal = next(h for h in run.summary.by_speaker_history if h["method"] == "mal[speaker]")
    assert f"| `mal[speaker]` | {100 * mal['wa']['0']:.1f} |" in "\n".join(history)


def test_record_keeps_the_command_its_output_commit_and_machine(tmp_path):
    assert publish.record("listing", ["bench", "list", "methods"], results=tmp_path) == 0
    run = CommittedRun(tmp_path / "listing")
    assert run.meta["command"] == "bench list methods" and run.meta["exit_status"] == 0
    assert "mal" in run.stdout and "lora" in run.stdout
    assert run.meta["commit"] == subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                                text=True).stdout.strip()
    assert run.meta["version"] and run.meta["machine"]["torch"] and len(run.meta["attempts"]) == 1
    # the CPU's bf16 kernels, as the cell keys of bf16 backbones name them, and the provenance says them
    from benchbench.backbone import bf16_kernels

    assert run.meta["machine"]["bf16_kernels"] == bf16_kernels("cpu") in ("amx", "avx512_bf16", "emulated")
    assert f"logical cores (bf16 kernels: {bf16_kernels('cpu')}), torch" in publish.view_provenance(run)
    # the resolved versions of the key packages, as installed here, and the provenance line names them
    import importlib.metadata as md

    for package in ("torch", "transformers", "peft", "pandas", "numpy", "mlflow", "optuna", "scikit-learn"):
        assert run.meta["versions"][package] == md.version(package)
    assert f", transformers {md.version('transformers')}, peft {md.version('peft')}," in publish.view_provenance(run)
    assert f", optuna {md.version('optuna')}; wall time" in publish.view_provenance(run)
    # the tracked files that differ from the commit, as git names them at the start
    changed = subprocess.run(["git", "diff", "--name-only", "HEAD"], cwd=ROOT, capture_output=True,
                             text=True).stdout.splitlines()
    assert run.meta["dirty_paths"] == changed and run.meta["dirty"] == bool(changed)
    assert publish.record("listing", ["bench", "list", "methods"], results=tmp_path) == 0  # again: a second attempt
    assert len(CommittedRun(tmp_path / "listing").meta["attempts"]) == 2
    with pytest.raises(ValueError, match="holds the run of `bench list methods`"):
        publish.record("listing", ["bench", "list", "tasks"], results=tmp_path)
    with pytest.raises(ValueError, match="--output: the recorder sets it"):
        publish.record("x", ["bench", "run", "--methods", "lora", "--tasks", "synthetic", "--output", "o"],
                       results=tmp_path)
    with pytest.raises(ValueError, match="a committed run is a `bench` command"):
        publish.record("x", ["python", "-c", "1"], results=tmp_path)


def test_record_refuses_code_imported_from_another_checkout(tmp_path):
    """A run recorded from a second checkout whose editable install points at the first would compute with
    the first's methods under the second's commit: the recorder refuses, naming the package."""
    publish.check_code_root()  # this checkout: every package resolves under it
    with pytest.raises(ValueError, match=r"benchbench would be imported from .*not from the checkout being "
                                         r"recorded"):
        publish.check_code_root(tmp_path)


def test_the_provenance_names_the_uncommitted_files_a_run_started_on():
    base = {"dirty": True, "commit": "a" * 40}
    assert publish._dirty_text({**base, "dirty_paths": ["tests/test_x.py"]}) == \
        " (uncommitted changes to `tests/test_x.py`)"
    many = publish._dirty_text({**base, "dirty_paths": [f"f{i}.py" for i in range(5)]})
    assert many == " (uncommitted changes to `f0.py`, `f1.py`, `f2.py` and 2 more)"
    assert publish._dirty_text(base) == " (uncommitted changes)"  # recorded before run.json named the paths
    assert publish._dirty_text({"dirty": False, "dirty_paths": []}) == ""


def test_record_runs_several_commands_into_one_run_and_renders_the_forms(tmp_path):
    """Two `bench run`s into one committed run (a method's other form beside the first's cells) and a
    closing `bench compare --all-pairs` on it: one summary with every cell, the comparisons kept, the
    `forms` view comparing the two forms of mal and nothing else, each command in the `command` view."""
    run = ["run", "--tasks", "synthetic", "--preset", "smoke", "--seeds", "0", "--task-set", "synthetic.n_train=24",
           "--task-set", "synthetic.n_test=12"]
    command = ["bench", *run, "--methods", "lora,mal", ";", "bench", *run, "--methods", "mal", "--set",
               "mal.surprise=initial", ";", "bench", "compare", "--all-pairs", "--resamples", "200"]
    assert publish.record("forms", command, results=tmp_path) == 0
    committed = CommittedRun(tmp_path / "forms")
    assert committed.meta["command"].count("\n") == 2 and committed.meta["command"].startswith("bench run")
    assert set(pd.read_csv(tmp_path / "forms" / "results.csv")["method"]) == {"lora", "mal", "mal[m0-surprise]"}
    assert committed.stdout.count("$ bench ") == 3
    # the committed summary is of every command's cells (each bench run summarised only its own)
    assert {c.method for c in committed.summary.cells} == {"lora", "mal", "mal[m0-surprise]"}
    assert {c["method"] for c in committed.summary.comparisons} >= {"mal", "mal[m0-surprise]"}
    per_form, pairs = publish.view_forms(committed).split("\n\n")
    assert [r.split("|")[2].strip() for r in per_form.splitlines()[2:]] == ["`lora`", "`mal`", "`mal[m0-surprise]`"]
    assert [r.split("|")[5].strip() != "" for r in per_form.splitlines()[2:]] == [False, True, True]
    rows = pairs.splitlines()[2:]
    assert len(rows) == 1 and "`mal`" in rows[0] and "`mal[m0-surprise]`" in rows[0]
    assert publish.view_command(committed).count("bench ") == 3
    assert "and 2 more commands" in publish.view_provenance(committed)
    # every trained stage's curves, as the cells recorded them; the replayed Phase 1 of mal is not repeated
    results = pd.read_csv(tmp_path / "forms" / "results.csv")
    curves = pd.read_csv(tmp_path / "forms" / "curves.csv.gz")
    lora_key = results.loc[results.method == "lora", "cell_key"].item()
    record = json.loads((tmp_path / "forms" / ".work" / "out" / "cells" / lora_key / "record.json").read_text())
    kept = curves[(curves.method == "lora") & (curves.curve == "lora_dev_ua")].sort_values("step")["value"]
    assert kept.tolist() == record["curves"]["lora_dev_ua"] and len(kept) >= 1
    # mal replayed lora's Phase 1: its record holds lora's curves, bit for bit, and the view shows them once
    mal = curves[curves.method == "mal"]
    assert mal.phase1_replayed.all() and not curves[curves.method == "lora"].phase1_replayed.any()
    assert mal[mal.curve == "lora_dev_ua"].sort_values("step")["value"].tolist() == kept.tolist()
    assert (mal.curve == "mal_dev_ua").any()  # its Phase 2
    view = publish.view_curves(committed)
    assert "| `mal` | 0 · 0 | mal (ua) |" in view and "| `mal` | 0 · 0 | lora (ua) |" not in view
    row = next(r for r in view.splitlines() if r.startswith("| `lora` | 0 · 0 | lora (ua) |"))
    assert " ".join(f"{100 * v:.1f}" for v in kept) in row
    steps = record["curves"]["lora_train_loss"]  # one value per optimiser step: the view shows each epoch's mean
    per = len(steps) // len(kept)
    assert len(steps) == per * len(kept) and f"| {sum(steps[:per]) / per:.2f} " in row
    folds = publish.view_folds(committed).splitlines()
    lora = results[results.method == "lora"].iloc[0]
    assert folds[0].startswith("| method | fold 0: WA · fit s |")
    assert f"| `lora` | {100 * lora.wa:.2f} · {lora.fit_seconds:.0f} |" in "\n".join(folds)
    assert len(folds) == 2 + 3  # lora, mal, mal[m0-surprise]
    with pytest.raises(ValueError, match="a committed run is a `bench` command"):
        publish.record("y", ["bench", "list", "methods", ";", "python", "-c", "1"], results=tmp_path)


def test_the_leaderboard_renders_from_committed_runs(tmp_path):
    """`bench leaderboard --from-runs`: the cells are the committed run's, to the digit."""
    from benchbench.cli import main

    folder = ROOT / "results" / "main-job"
    assert main(["leaderboard", "--from-runs", str(folder), "--output", str(tmp_path), "--resamples", "200"]) == 0
    got = {c["method"]: c for c in json.loads((tmp_path / "leaderboard.json").read_text())["summary"]["cells"]}
    want = {c.method: c for c in CommittedRun(folder).summary.cells}
    assert set(got) == set(want)
    for m in want:
        assert got[m]["wa"]["mean"] == pytest.approx(want[m].stats["wa"]["mean"], abs=1e-12)
    page = (tmp_path / "leaderboard.html").read_text()
    assert "main-job" in page and CommittedRun(folder).meta["commit"][:10] in page


def test_a_folder_without_predictions_is_named(tmp_path):
    from benchbench.leaderboard.collect import collect_folders

    shutil.copy(ROOT / "results" / "main-job" / "results.csv", tmp_path / "results.csv")
    with pytest.raises(FileNotFoundError, match="predictions.csv: not found"):
        collect_folders([tmp_path])


def test_a_cell_in_two_folders_is_kept_once():
    from benchbench.leaderboard.collect import collect_folders

    folder = ROOT / "results" / "main-job"
    once, twice = collect_folders([folder]), collect_folders([folder, folder])
    assert len(twice.results) == len(once.results) == 12 and len(twice.predictions) == len(once.predictions)
    assert set(once.results["preset"]) == {"default"} and set(once.predictions["preset"]) == {"default"}


def _parts_of(tmp_path, run: str = "main-job") -> list[str]:
    """``results/<run>`` split by seed into committed runs of one seed each under ``tmp_path`` (as if each
    seed had been recorded on its own): their cells, predictions, task facts and provenance."""
    src = ROOT / "results" / run
    rows = pd.read_csv(src / "results.csv", dtype={"cell_key": str})
    preds = pd.read_csv(src / "predictions.csv.gz", dtype=str, keep_default_na=False)
    meta = json.loads((src / "run.json").read_text())
    names = []
    for seed, g in rows.groupby("seed"):
        d = tmp_path / f"{run}-s{seed}"
        d.mkdir()
        g.to_csv(d / "results.csv", index=False)
        preds[preds["cell_key"].isin(g["cell_key"])].to_csv(d / "predictions.csv.gz", index=False)
        for f in ("predictions-dtypes.json", "summary.json"):
            shutil.copyfile(src / f, d / f)
        (d / "stdout.txt").write_text(f"seed {seed}\n")
        (d / "run.json").write_text(json.dumps({**meta, "command": f"{meta['command']} --seeds {seed}"}))
        names.append(d.name)
    return names


def test_join_makes_one_run_of_parts_recorded_one_seed_each(tmp_path):
    """A run recorded a seed at a time and joined has the whole run's statistics: main-job split by seed
    and joined back gives main-job's means, n and paired differences; every view renders it, the
    provenance names the parts; a part changed afterwards makes `check` fail."""
    parts = _parts_of(tmp_path)
    assert len(parts) == 3
    joined = CommittedRun(publish.join("main-seeds", parts, results=tmp_path))
    whole = committed_runs()["main-job"]
    got, want = ({c.method: c for c in r.summary.cells} for r in (joined, whole))
    assert set(got) == set(want) == {"zero_shot", "lora", "full_context[speaker]", "mal[speaker]"}
    for m in want:
        assert got[m].n == want[m].n == 3 and got[m].seeds == want[m].seeds
        for k in ("wa", "ua", "wf1"):
            assert got[m].stats[k]["mean"] == pytest.approx(want[m].stats[k]["mean"], abs=1e-12)
    diffs = {(c["method"], c["reference"]): c["bootstrap"]["wa"]["diff"] for c in joined.summary.comparisons}
    for c in whole.summary.comparisons:
        assert diffs[(c["method"], c["reference"])] == pytest.approx(c["bootstrap"]["wa"]["diff"], abs=1e-12)
    assert joined.meta["commit"] == whole.meta["commit"] and len(joined.meta["attempts"]) == 3
    assert [p["name"] for p in joined.meta["parts"]] == parts
    assert joined.meta["command"].splitlines()[1].endswith("--seeds 1")
    assert joined.stdout.startswith(f"# results/{parts[0]}\nseed 0\n")
    for view in publish.VIEWS:
        if view not in ("probe", "paper-scale", "forms"):
            assert publish.VIEWS[view](joined)
    table = publish.view_table(joined)
    assert f"| `lora` | 3 (3 x 1) | {100 * want['lora'].stats['wa']['mean']:.2f} [" in table
    prov = publish.view_provenance(joined)
    assert f"joined from `results/{parts[0]}`, `results/{parts[1]}`, `results/{parts[2]}`: 3 commands" in prov
    assert "over 3 attempts" in prov
    # current until a part's cells change; a part that is gone is named
    assert publish.stale_joins(tmp_path) == []
    rows = pd.read_csv(tmp_path / parts[1] / "results.csv")
    rows.loc[0, "wa"] = 0.5
    rows.to_csv(tmp_path / parts[1] / "results.csv", index=False)
    assert publish.stale_joins(tmp_path) == [f"results/main-seeds: its parts' cells changed (join again: python -m "
                                             f"benchbench.tools.publish join main-seeds {' '.join(parts)})"]
    shutil.rmtree(tmp_path / parts[2])
    assert publish.stale_joins(tmp_path) == [f"results/main-seeds: joins results/{parts[2]}, which is not a committed run"]


def test_join_refuses_parts_that_are_not_comparable(tmp_path):
    """Another machine, other code, a cell in two parts, an unfinished part, other data: each is refused,
    naming the part."""
    parts = _parts_of(tmp_path)

    def edit(part, **changes):
        path = tmp_path / part / "run.json"
        old = path.read_text()
        path.write_text(json.dumps({**json.loads(old), **changes}))
        return lambda: path.write_text(old)

    undo = edit(parts[1], machine={**json.loads((tmp_path / parts[0] / "run.json").read_text())["machine"], "cpu": "AMD EPYC"})
    with pytest.raises(ValueError, match=f"results/{parts[1]}: ran on another machine .*cpu 'Intel.*' vs 'AMD EPYC'"):
        publish.join("j", parts, results=tmp_path)
    undo()
    # one CPU name over CPUs with other bf16 kernels: refused where both parts recorded them, not where
    # one part's run.json predates the record
    mach = json.loads((tmp_path / parts[0] / "run.json").read_text())["machine"]
    undo0 = edit(parts[0], machine={**mach, "bf16_kernels": "avx512_bf16"})
    undo = edit(parts[1], machine={**mach, "bf16_kernels": "emulated"})
    with pytest.raises(ValueError, match=f"results/{parts[1]}: ran on another machine .*bf16_kernels 'avx512_bf16' "
                                         "vs 'emulated'"):
        publish.join("j", parts, results=tmp_path)
    undo()
    assert "bf16_kernels" not in mach
    assert publish.join("j-old-and-new", parts, results=tmp_path).is_dir()
    undo0()
    # other package versions: refused where both parts recorded them
    versions = {"torch": "2.13.0+cpu", "pandas": "3.1.2", "benchbench": "0.2.0"}
    undo0 = edit(parts[0], versions=versions)
    undo = edit(parts[1], versions={**versions, "pandas": "2.3.3", "benchbench": "0.2.1"})
    with pytest.raises(ValueError, match=f"results/{parts[1]}: ran on other package versions than results/{parts[0]} "
                                         r"\(pandas 3.1.2 vs 2.3.3\)$"):
        publish.join("j", parts, results=tmp_path)
    undo()
    joined = publish.join("j-versions", parts, results=tmp_path)  # one part without them: joined
    assert json.loads((joined / "run.json").read_text())["versions"] == versions
    undo0()
    # a commit whose code differs (the one before the last change to the Ultravox backbones)
    last = subprocess.run(["git", "log", "-1", "--format=%H", "--", "backbones/ultravox.py"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
    before = subprocess.run(["git", "rev-parse", f"{last}^"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    undo = edit(parts[2], commit=before)
    with pytest.raises(ValueError, match=f"results/{parts[2]}: commit {before[:10]} differs .* in code the cells ran: "
                                         ".*backbones/"):
        publish.join("j", [parts[0], parts[2]], results=tmp_path)
    undo()
    undo = edit(parts[2], commit="0" * 40)
    with pytest.raises(ValueError, match=f"results/{parts[2]}: cannot compare its commit 0000000000"):
        publish.join("j", parts, results=tmp_path)
    undo()
    undo = edit(parts[0], exit_status=1)
    with pytest.raises(ValueError, match=f"results/{parts[0]}: its command exited with 1"):
        publish.join("j", parts, results=tmp_path)
    undo()
    shutil.copytree(tmp_path / parts[0], tmp_path / "again")
    with pytest.raises(ValueError, match=r"results/again: cell \('synthetic', .*, 0, 0\) is also in results/main-job-s0"):
        publish.join("j", [*parts, "again"], results=tmp_path)
    summary = json.loads((tmp_path / "again" / "summary.json").read_text())
    summary["tasks"]["synthetic"]["manifest_sha256"] = "f" * 64
    (tmp_path / "again" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(ValueError, match="results/again: task synthetic's data manifest differs from results/main-job-s0"):
        publish.join("j", [*parts, "again"], results=tmp_path)
    with pytest.raises(ValueError, match="give two or more distinct"):
        publish.join("j", [parts[0], parts[0]], results=tmp_path)
    with pytest.raises(FileNotFoundError, match="nope/run.json: not found"):
        publish.join("j", [parts[0], "nope"], results=tmp_path)
    assert not (tmp_path / "j").exists()  # nothing written by a refused join


def test_join_accepts_a_code_difference_only_named_with_its_reason(tmp_path):
    """A difference in code the cells ran joins only where the person joining names each path with the
    reason (``--accept PATH=REASON``); the acceptance is kept in run.json and said in the provenance, and
    an acceptance of a path that does not differ is refused."""
    parts = _parts_of(tmp_path)
    last = subprocess.run(["git", "log", "-1", "--format=%H", "--", "benchbench/backbone.py"], cwd=ROOT,
                          capture_output=True, text=True).stdout.strip()
    changed = subprocess.run(["git", "diff", "--name-only", f"{last}^", last], cwd=ROOT, capture_output=True,
                             text=True).stdout.split()
    code = sorted(f for f in changed if not f.startswith(publish.NON_CELL_PATHS))
    assert "benchbench/backbone.py" in code
    for part, commit in zip(parts, (f"{last}^", last, last)):
        path = tmp_path / part / "run.json"
        sha = subprocess.run(["git", "rev-parse", commit], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        path.write_text(json.dumps({**json.loads(path.read_text()), "commit": sha}))
    with pytest.raises(ValueError, match="in code the cells ran: .*benchbench/backbone.py"):
        publish.join("j", parts, results=tmp_path)
    with pytest.raises(ValueError, match="--accept nothing/here.py: no part's commit differs"):
        publish.join("j", parts, results=tmp_path, accept={**{f: "read" for f in code}, "nothing/here.py": "x"})
    assert not (tmp_path / "j").exists()
    joined = CommittedRun(publish.join("j", parts, results=tmp_path, accept={f: "the cell key only" for f in code}))
    kept = joined.meta["accepted_code_differences"]
    assert [a["path"] for a in kept] == code and {a["reason"] for a in kept} == {"the cell key only"}
    assert len(kept[0]["commits"]) == 2
    assert "(the same code but `benchbench/backbone.py`, accepted at the join: the cell key only" in \
        publish.view_provenance(joined)
    assert publish.main(["join", "k", *parts, "--accept", "benchbench/backbone.py"]) == 2
