"""``bench``: the command line.

    bench run --methods M1,M2 --tasks T1 [--backbone tiny-qwen2-audio] [--seeds 0,1,2]
              [--preset smoke|default|paper] [--data-dir DIR] [--tracking-uri URI] [--output DIR]
    bench list methods|tasks|backbones
    bench compare RUN_DIR [--reference lora] [--all-pairs]
    bench leaderboard [--tracking-uri URI] [--experiment NAME] --output DIR
    bench sweep --method M --task T --trials N [--storage URL] [--study NAME] [--preset P]
    bench run --config BEST.json --tasks T1      (a config exported by bench sweep)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .backbone import BACKBONES
from .method import METHODS
from .task import TASKS


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in _csv(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _override(s: str) -> tuple[str, str, object]:
    """``name.key=value`` for a method or a task (value parsed as JSON when it can be, e.g.
    ``mal.lora.lr=1e-3``, ``synthetic.n_train=160``)."""
    if "=" not in s or "." not in s.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"expected NAME.KEY=VALUE (a method or task name), got {s!r}")
    key, value = s.split("=", 1)
    method, path = key.split(".", 1)
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass
    return method, path, value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description="Context and memory methods for conversational SER.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run methods x tasks x backbone x seeds x folds")
    r.add_argument("--methods", type=_csv, default=None,
                   help="comma-separated, e.g. lora,mal (default with --config: the file's methods)")
    r.add_argument("--config", default=None, metavar="FILE",
                   help="method configs from a file exported by `bench sweep` (applied over the preset)")
    r.add_argument("--tasks", type=_csv, required=True, help="comma-separated, e.g. synthetic,emodb")
    r.add_argument("--backbone", default="tiny-qwen2-audio", help="see `bench list backbones`")
    r.add_argument("--weights", default=None, metavar="DIR|HUB_ID",
                   help="real backbones: checkpoint folder or hub id (default: the backbone's hub id, from the HF cache)")
    r.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="real backbones: weight dtype")
    r.add_argument("--device", default=None, help="real backbones: e.g. cuda")
    r.add_argument("--device-map", default=None, help="real backbones: from_pretrained's device_map, e.g. auto")
    r.add_argument("--allow-download", action="store_true",
                   help="real backbones: let huggingface_hub download missing weights (off: never silently)")
    r.add_argument("--seeds", type=_ints, default=[0, 1, 2])
    r.add_argument("--folds", type=_ints, default=None, help="subset of fold indices (default: all)")
    r.add_argument("--preset", default="default", choices=["smoke", "default", "paper"],
                   help="smoke: seconds per cell; default: CPU-sized; paper: the papers' hyperparameters")
    r.add_argument("--data-dir", default=None, help="dataset folder for tasks that read files")
    r.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's local default)")
    r.add_argument("--output", default=None, help="output folder (default: a new folder under runs/)")
    r.add_argument("--task-set", dest="task_options", type=_override, action="append", default=[],
                   metavar="TASK.KEY=VALUE",
                   help="task option, e.g. synthetic.n_train=160 (repeatable; the cells' preset is then "
                        "labelled default+n_train=160 so the leaderboard keeps them apart)")
    r.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                   metavar="METHOD.KEY=VALUE", help="override a method config value (repeatable)")
    r.add_argument("--no-progress", action="store_true")
    ls = sub.add_parser("list", help="list registered methods, tasks or backbones")
    ls.add_argument("what", choices=["methods", "tasks", "backbones"])
    c = sub.add_parser("compare", help="paired statistics for a finished run's output folder (no rerun)")
    c.add_argument("run_dir", help="a `bench run --output` folder (predictions.csv, summary.json)")
    c.add_argument("--reference", default="lora", help="method every other is compared with")
    c.add_argument("--all-pairs", action="store_true", help="compare every pair of methods instead")
    c.add_argument("--resamples", type=int, default=2000, help="dialogue-bootstrap resamples")
    sw = sub.add_parser("sweep", help="Optuna search of one method's hyperparameters on a task's dev split")
    sw.add_argument("--method", required=True)
    sw.add_argument("--task", required=True)
    sw.add_argument("--trials", type=int, default=50, help="finished trials the study should hold")
    sw.add_argument("--storage", default=None,
                    help="journal:PATH (default journal:runs/sweeps/optuna.journal) or an RDB URL")
    sw.add_argument("--study", default=None, help="study name (default: METHOD-TASK-BACKBONE-PRESET)")
    sw.add_argument("--preset", default="default", choices=["smoke", "default", "paper"])
    sw.add_argument("--backbone", default="tiny-qwen2-audio")
    sw.add_argument("--data-dir", default=None)
    sw.add_argument("--fold", type=int, default=None, help="fold whose dev split is the objective (default: first)")
    sw.add_argument("--seed", type=int, default=0)
    sw.add_argument("--metric", default="ua", choices=["wa", "ua", "wf1", "macro_f1"], help="dev metric")
    sw.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"])
    sw.add_argument("--tracking-uri", default=None)
    sw.add_argument("--export", default=None, help="best-config file (default: runs/sweeps/STUDY.best.json)")
    lb = sub.add_parser("leaderboard", help="leaderboard.html / .md / .tex from the runs logged to MLflow")
    lb.add_argument("--output", required=True, help="folder for leaderboard.html, .md, .tex and .json")
    lb.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's local default)")
    lb.add_argument("--experiment", default="benchbench", help="MLflow experiment (default: benchbench)")
    lb.add_argument("--reference", default="lora", help="method the significance marks compare against")
    lb.add_argument("--runs", type=_csv, default=None, metavar="ID1,ID2",
                    help="only these `bench run` parent run ids (default: the latest run of every cell)")
    lb.add_argument("--preset", default=None, help="only cells of this preset")
    lb.add_argument("--tasks", type=_csv, default=None, help="only these tasks")
    lb.add_argument("--resamples", type=int, default=2000, help="dialogue-bootstrap resamples")
    return p


def compare_run(run_dir: str, reference: str = "lora", all_pairs: bool = False, n_resamples: int = 2000) -> list[dict]:
    """Comparisons (:func:`benchbench.stats.compare_all`) from a run folder; ``FileNotFoundError`` or
    ``ValueError`` naming the file when it is missing or unusable."""
    import pandas as pd

    from .stats import compare_all

    folder = Path(run_dir)
    preds_path, summary_path = folder / "predictions.csv", folder / "summary.json"
    for f in (preds_path, summary_path):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: not found (is {folder} a `bench run --output` folder?)")
    preds = pd.read_csv(preds_path)
    missing = {"method", "task", "backbone", "fold", "seed", "dialogue_id", "utterance_id", "label",
               "prediction", "correct"} - set(preds.columns)
    if missing:
        raise ValueError(f"{preds_path}: missing columns {sorted(missing)}")
    tasks = json.loads(summary_path.read_text())["tasks"]
    labels = {t: info.get("labels") or sorted(set(preds.loc[preds.task == t, "label"]))
              for t, info in tasks.items()}
    return compare_all(preds, labels, reference=reference, all_pairs=all_pairs, n_resamples=n_resamples)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command == "list":
        reg = {"methods": METHODS, "tasks": TASKS, "backbones": BACKBONES}[args.what]
        width = max([len(n) for n in reg.names()] + [15]) + 1
        for name in reg.names():
            error = reg.check(name)
            about = ""
            if not error and args.what in ("tasks", "backbones"):
                about = getattr(reg.get(name), "needs", "")
                about = f"  needs: {about}" if about else ""
            print(f"{name:<{width}} {reg.origin(name)}{about}" + (f"  BROKEN: {error}" if error else ""))
        return 0

    if args.command == "sweep":
        from .sweep import DEFAULT_STORAGE, SweepSpec, run_sweep

        spec = SweepSpec(method=args.method, task=args.task, trials=args.trials,
                         storage=args.storage or DEFAULT_STORAGE, study=args.study, preset=args.preset,
                         backbone=args.backbone, data_dir=args.data_dir, fold=args.fold, seed=args.seed,
                         metric=args.metric, pruner=args.pruner, tracking_uri=args.tracking_uri, export=args.export)
        try:
            res = run_sweep(spec)
        except (KeyError, ValueError, FileNotFoundError, ImportError) as e:
            print(f"bench: error: {e.args[0] if e.args else e}", file=sys.stderr)
            return 2
        print(f"study {res['study']} ({res['storage']}): {res['n_finished']} finished trials, "
              f"{len(res['ran'])} run by this worker")
        if res["best_trial"] is not None:
            print(f"best trial {res['best_trial']}: dev {args.metric} {res['best_value']:.4f} {res['best_params']}")
            print(f"best config: {res['config_file']}  (bench run --config {res['config_file']} --tasks {args.task})")
        return 0

    if args.command == "leaderboard":
        from .leaderboard import build

        try:
            paths = build(args.output, args.tracking_uri, args.experiment, args.reference, args.runs,
                          args.preset, args.tasks, args.resamples)
        except ValueError as e:
            print(f"bench: error: {e}", file=sys.stderr)
            return 2
        for kind, path in paths.items():
            print(f"{kind:>4}: {path}")
        return 0

    from .harness import RunSpec, format_summary, run

    if args.command == "compare":
        try:
            comparisons = compare_run(args.run_dir, args.reference, args.all_pairs, args.resamples)
        except (FileNotFoundError, ValueError) as e:
            print(f"bench: error: {e}", file=sys.stderr)
            return 2
        print(format_summary({"cells": [], "tasks": {}, "comparisons": comparisons, "checks": {"leakage": []},
                              "failed_cells": []}))
        (Path(args.run_dir) / "comparisons.json").write_text(json.dumps(comparisons, indent=2))
        return 0

    overrides: dict = {}
    if args.config:
        from .sweep import load_config_file

        try:
            overrides = {m: dict(c) for m, c in load_config_file(args.config).items()}
        except ValueError as e:
            print(f"bench: error: {e}", file=sys.stderr)
            return 2
        if args.methods is None:
            args.methods = list(overrides)
    if not args.methods:
        print("bench: error: --methods is required (or --config with methods)", file=sys.stderr)
        return 2
    for method, path, value in args.overrides:
        node = overrides.setdefault(method, {})
        *parents, leaf = path.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    task_options: dict = {}
    for task, key, value in args.task_options:
        task_options.setdefault(task, {})[key] = value
    spec = RunSpec(methods=args.methods, tasks=args.tasks, backbone=args.backbone, seeds=args.seeds,
                   preset=args.preset, data_dir=args.data_dir, tracking_uri=args.tracking_uri,
                   output=args.output, folds=args.folds, method_overrides=overrides, task_options=task_options,
                   backbone_options={"weights": args.weights, "dtype": args.dtype, "device": args.device,
                                     "device_map": args.device_map, "allow_download": args.allow_download})
    try:
        summary = run(spec, show_progress=not args.no_progress)
    except (KeyError, ValueError, FileNotFoundError, ImportError) as e:
        print(f"bench: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    print(format_summary(summary))
    print(f"\nresults: {summary['run']['output']}  (MLflow: {summary['run']['mlflow_tracking_uri']}, "
          f"parent run {summary['run']['mlflow_parent_run_id']})")
    return 1 if summary["failed_cells"] else 0


if __name__ == "__main__":
    sys.exit(main())
