"""``bench``: the command line. Each subcommand builds a config object and calls the library.

    bench run --methods M1,M2 --tasks T1 [--backbone B] [--seeds 0,1,2] [--preset P] ...   (RunSpec -> harness.run)
    bench run --config BEST.json --tasks T1      (a config exported by bench sweep)
    bench sweep --method M --task T --trials N [--storage URL] ...                    (SweepSpec -> sweep.run_sweep)
    bench leaderboard --output DIR [--tracking-uri URI] ...        (LeaderboardSpec -> leaderboard.build)
    bench compare RUN_DIR [--reference lora] [--all-pairs]                     (analysis.compare_run_dir)
    bench list methods|tasks|backbones

``bench run`` and ``bench sweep`` take the same task options (``--data-dir``, ``--task-set``) and
backbone options (``--backbone``, ``--weights``, ``--dtype``, ``--device``, ``--device-map``,
``--allow-download``). Errors in what the user gave (an unknown name, a bad option, a missing file)
print one ``bench: error:`` line naming it and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

PRESETS = ["smoke", "default", "paper"]


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` shows every default (unless the help text already says it, or there is none:
    ``None``, an empty list, a flag's ``False``) and keeps the descriptions' line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default in (None, [], False) or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action)


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in _csv(s)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _key_value(s: str) -> tuple[str, object]:
    """``key=value`` (value parsed as JSON when it can be, e.g. ``hidden_size=1024``)."""
    if "=" not in s or not s.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    key, value = s.split("=", 1)
    try:
        value = json.loads(value)
    except json.JSONDecodeError:
        pass
    return key, value


def _override(s: str) -> tuple[str, str, object]:
    """``name.key=value`` for a method or a task (value parsed as JSON when it can be, e.g.
    ``mal.lora.lr=1e-3``, ``synthetic.n_train=160``)."""
    if "=" not in s or "." not in s.split("=", 1)[0]:
        raise argparse.ArgumentTypeError(f"expected NAME.KEY=VALUE (a method or task name), got {s!r}")
    key, value = _key_value(s)
    method, path = key.split(".", 1)
    return method, path, value


def nest_overrides(triples, overrides: dict | None = None) -> dict:
    """``--set`` values (``(method, "lora.epochs", 1)`` triples from :func:`_override`) as nested config
    overrides by method (``{"mal": {"lora": {"epochs": 1}}}``), added to ``overrides`` (returned)."""
    overrides = {} if overrides is None else overrides
    for method, path, value in triples:
        node = overrides.setdefault(method, {})
        *parents, leaf = path.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    return overrides


# ---------------------------------------------------------------------------- shared option groups
def _add_task_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("task options")
    g.add_argument("--data-dir", action="append", default=None, metavar="PATH|TASK=PATH",
                   help="dataset folder for tasks that read files (see `bench list tasks`); TASK=PATH gives one "
                        "task its own folder (repeatable: --data-dir emodb=DIR1 --data-dir iemocap=DIR2)")
    g.add_argument("--task-set", dest="task_options", type=_override, action="append", default=[],
                   metavar="TASK.KEY=VALUE",
                   help="task option, e.g. synthetic.n_train=160 (repeatable; the cells' preset is then "
                        "labelled default+n_train=160 so the leaderboard keeps them apart)")


def _add_backbone_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone options (--weights, --device-map, --allow-download: the real backbones "
                                 "only; --dtype and --device: every backbone)")
    g.add_argument("--backbone", default=None,
                   help="see `bench list backbones` (default: each task's own, `bench list tasks`: a pretrained "
                        "Whisper encoder for the speech corpora, tiny-qwen2-audio for synthetic)")
    g.add_argument("--backbone-set", dest="backbone_set", type=_key_value, action="append", default=[],
                   metavar="KEY=VALUE",
                   help="a tiny backbone's LM size: hidden_size=N (a multiple of 64), num_hidden_layers=N "
                        "(repeatable; the cells' backbone is then labelled e.g. tiny-qwen2-audio+hidden_size=1024); "
                        "with --random-init, a paper architecture's sizes (lm_layers, lm_width, lm_heads, "
                        "lm_kv_heads, lm_ffn, vocab_size, audio_layers, audio_width, audio_heads, audio_ffn)")
    g.add_argument("--weights", default=None, metavar="DIR|HUB_ID",
                   help="checkpoint folder or hub id (default: the backbone's hub id, from the HF cache)")
    g.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="weight dtype (default: the checkpoint's own; a tiny backbone's float32 init is cast)")
    g.add_argument("--device", default=None, help="e.g. cuda")
    g.add_argument("--autocast", default=None, choices=["auto", "bf16", "off"],
                   help="the pretrained-LM backbone's mixed precision (default auto: bf16 autocast where the CPU "
                        "or GPU computes bf16 natively; recorded per cell as lm_autocast)")
    g.add_argument("--device-map", default=None, help="from_pretrained's device_map, e.g. auto")
    g.add_argument("--allow-download", action="store_true",
                   help="let huggingface_hub download missing weights (off: never silently)")
    g.add_argument("--random-init", action="store_true",
                   help="a paper backbone (qwen2-audio-7b, audio-flamingo-3, ultravox-v0.4) as its published "
                        "architecture with random weights, built on --device in --dtype: cost without a download; "
                        "cells labelled e.g. qwen2-audio-7b+random_init (--backbone-set lm_layers=N, lm_width=N, "
                        "audio_layers=N, ... shrink it)")


def _task_options(args) -> dict:
    out: dict = {}
    for task, key, value in args.task_options:
        out.setdefault(task, {})[key] = value
    return out


def _backbone_options(args) -> dict:
    return {"weights": args.weights, "dtype": args.dtype, "device": args.device, "device_map": args.device_map,
            "autocast": args.autocast,
            "allow_download": args.allow_download, "random_init": args.random_init, **dict(args.backbone_set)}


# ---------------------------------------------------------------------------- subcommands
def _check_names(methods: list[str], tasks: list[str], backbone: str) -> None:
    """Unknown names fail in milliseconds, before torch, transformers and mlflow are imported."""
    from .names import BACKBONES, METHODS
    from .task import TASKS

    for m in methods:
        METHODS.require(m)
    for t in tasks:
        TASKS.require(t)
    if backbone is not None:
        BACKBONES.require(backbone)


def cmd_run(args) -> int:
    from .task import parse_data_dirs

    overrides: dict = {}
    if args.config:
        from .sweep import load_config_file

        overrides = {m: dict(c) for m, c in load_config_file(args.config).items()}
        if args.methods is None:
            args.methods = list(overrides)
    if not args.methods:
        raise ValueError("--methods is required (or --config with methods)")
    _check_names(args.methods, args.tasks, args.backbone)
    from .analysis import format_summary
    from .harness import RunSpec, run

    nest_overrides(args.overrides, overrides)
    spec = RunSpec(methods=args.methods, tasks=args.tasks, backbone=args.backbone, seeds=args.seeds,
                   preset=args.preset, data_dir=parse_data_dirs(args.data_dir), tracking_uri=args.tracking_uri,
                   output=args.output, folds=args.folds, method_overrides=overrides,
                   task_options=_task_options(args), backbone_options=_backbone_options(args),
                   rerun=args.rerun, executor=args.executor, ray_address=args.ray_address,
                   cpus_per_cell=args.cpus_per_cell, gpus_per_cell=args.gpus_per_cell, max_retries=args.max_retries,
                   threads=args.threads, tune=args.tune, tune_seed=args.tune_seed)
    summary = run(spec, show_progress=not args.no_progress)
    print(format_summary(summary))
    if spec.tune:
        print(f"tuned: every method with {spec.tune} Optuna trials per cell on its dev split (never test), trial 0 "
              "the preset; the values are results.csv's tuned_params, each study is stored with its cell "
              "(tuning.journal)" + (f"; every seed of a fold takes the values tuned at seed {spec.tune_seed}"
                                    if spec.tune_seed is not None else ""))
    print(f"\ncells: {summary.run['cells_computed']} computed, {summary.run['cells_reused']} reused from earlier runs"
          + ("" if args.rerun else " (--rerun recomputes them)"))
    print(f"results: {summary.run['output']}  (MLflow: {summary.run['mlflow_tracking_uri']}, "
          f"parent run {summary.run['mlflow_parent_run_id']})")
    if summary.run["cells_not_logged"]:
        print(f"tracking store unreachable ({summary.run['tracking_problem']}): {summary.run['cells_not_logged']} "
              f"cell(s) are in {summary.run['output']}/cells/ only; the same command logs them once it is back")
    return 1 if summary.failed_cells else 0


def cmd_sweep(args) -> int:
    from .task import parse_data_dirs

    _check_names([args.method], [args.task], args.backbone)
    from .sweep import DEFAULT_STORAGE, SweepSpec, run_sweep

    task_options = _task_options(args)
    stray = sorted(set(task_options) - {args.task})
    if stray:
        raise ValueError(f"--task-set {stray[0]}.*: task {stray[0]!r} is not the swept task {args.task!r}")
    spec = SweepSpec(method=args.method, task=args.task, trials=args.trials,
                     storage=args.storage or DEFAULT_STORAGE, study=args.study, preset=args.preset,
                     backbone=args.backbone, data_dir=parse_data_dirs(args.data_dir), fold=args.fold, seed=args.seed,
                     metric=args.metric, pruner=args.pruner, tracking_uri=args.tracking_uri, export=args.export,
                     task_options=task_options.get(args.task, {}), backbone_options=_backbone_options(args),
                     threads=args.threads)
    res = run_sweep(spec)
    print(f"study {res['study']} ({res['storage']}): {res['n_finished']} finished trials, "
          f"{len(res['ran'])} run by this worker")
    if res["best_trial"] is not None:
        print(f"best trial {res['best_trial']}: dev {args.metric} {res['best_value']:.4f} {res['best_params']}")
        print(f"best config: {res['config_file']}  (bench run --config {res['config_file']} --tasks {args.task})")
    return 0


def cmd_leaderboard(args) -> int:
    from .leaderboard import LeaderboardSpec, build

    paths = build(LeaderboardSpec(output=args.output, tracking_uri=args.tracking_uri, experiment=args.experiment,
                                  reference=args.reference, parent_run_ids=args.runs, preset=args.preset,
                                  tasks=args.tasks, n_resamples=args.resamples, folders=args.from_runs))
    for kind, path in paths.items():
        print(f"{kind:>4}: {path}")
    return 0


def cmd_compare(args) -> int:
    from .analysis import Summary, compare_run_dir, format_summary

    comparisons = compare_run_dir(args.run_dir, args.reference, args.all_pairs, args.resamples)
    print(format_summary(Summary(comparisons=comparisons)))
    (Path(args.run_dir) / "comparisons.json").write_text(json.dumps(comparisons, indent=2))
    return 0


def cmd_speed(args) -> int:
    _check_names(args.methods, [], args.backbone)
    from .speed import main as speed_table

    text = speed_table(args.backbone or "tiny-qwen2-audio", _backbone_options(args), args.methods, threads=args.threads,
                       curve=not args.no_curve, repeats=args.repeats, n_dialogues=args.dialogues)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


def cmd_probe(args) -> int:
    from .task import parse_data_dirs

    _check_names([], args.tasks, args.backbone)
    from .harness import RunSpec, lora_cells, prepare
    from .probe import COLUMNS, format_probe, probe_projector, probe_task

    spec = RunSpec(methods=["lora"] if args.projector else [], tasks=args.tasks, backbone=args.backbone,
                   seeds=args.seeds, preset=args.preset, data_dir=parse_data_dirs(args.data_dir), folds=args.folds,
                   task_options=_task_options(args), backbone_options=_backbone_options(args), threads=args.threads)
    tasks, backbones = prepare(spec)
    if args.projector:
        frozen = sorted({b.name for b in backbones.values() if not b.trainable_projector})
        if frozen:
            print(f"error: --projector probes a projector that trains with each method; backbone {frozen[0]}'s is "
                  "frozen inside its audio path (bench probe without --projector probes its output)", file=sys.stderr)
            return 2
    from .cells import torch_threads

    rows = []
    say = lambda text: print(text, flush=True)  # noqa: E731
    with torch_threads(args.threads):  # the process's own count afterwards (a caller's, under main())
        for name, task in tasks.items():
            if args.projector:
                for cell in lora_cells(spec, task, backbones[name]):
                    rows += probe_projector(cell, progress=say)
            else:
                rows += probe_task(task, backbones[name], args.folds, progress=say)
    print(format_probe(rows))
    if args.output:
        import pandas as pd

        pd.DataFrame(rows, columns=list(COLUMNS)).to_csv(args.output, index=False)
    return 0


def cmd_list(args) -> int:
    if args.what == "tasks":  # only the registry asked for: tasks load without torch
        from .task import TASKS as reg
    elif args.what == "methods":
        from .method import METHODS as reg
    else:
        from .backbone import BACKBONES as reg
    width = max([len(n) for n in reg.names()] + [15]) + 1
    for name in reg.names():
        error = reg.check(name)
        about = ""
        if not error and args.what in ("tasks", "backbones"):
            about = reg.get(name).needs  # Task.needs / BackboneSpec.needs
            about = f"  needs: {about}" if about else ""
            source = getattr(reg.get(name), "source", "")  # where a task's corpus is obtained
            about += f"; from {source}" if source else ""
            default = getattr(reg.get(name), "default_backbone", None)  # a task's backbone without --backbone
            about += f"; default backbone: {default}" if default else ""
            note = getattr(reg.get(name), "note", "")  # a backbone's caveat (BackboneSpec.note)
            about += f"; NOTE: {note}" if note else ""
        print(f"{name:<{width}} {reg.origin(name)}{about}" + (f"  BROKEN: {error}" if error else ""))
    return 0


# ---------------------------------------------------------------------------- the parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench", description="Context and memory methods for conversational SER.",
                                formatter_class=_Formatter)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run methods x tasks x backbone x seeds x folds", formatter_class=_Formatter)
    r.add_argument("--methods", type=_csv, default=None,
                   help="comma-separated, e.g. lora,mal (with --config: the file's methods)")
    r.add_argument("--config", default=None, metavar="FILE",
                   help="method configs from a file exported by `bench sweep` (applied over the preset)")
    r.add_argument("--tasks", type=_csv, required=True, help="comma-separated, e.g. synthetic,emodb")
    r.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="comma-separated method seeds")
    r.add_argument("--folds", type=_ints, default=None, help="subset of fold indices (default: all)")
    r.add_argument("--preset", default="default", choices=PRESETS,
                   help="smoke: seconds per cell; default: CPU-sized; paper: the papers' hyperparameters")
    r.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                   metavar="METHOD.KEY=VALUE", help="override a method config value (repeatable)")
    _add_task_options(r)
    _add_backbone_options(r)
    r.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's local default)")
    r.add_argument("--output", default=None, help="output folder (default: a new folder under runs/)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    x = r.add_argument_group("execution")
    x.add_argument("--executor", default="local", choices=["local", "ray"],
                   help="local: this process, one cell at a time; ray: each cell a Ray task")
    x.add_argument("--ray-address", default=None,
                   help="join this Ray cluster (e.g. ray://head:10001 or auto; default: start Ray on this machine)")
    x.add_argument("--cpus-per-cell", type=float, default=1.0, help="Ray CPUs per cell")
    x.add_argument("--gpus-per-cell", type=float, default=0.0, help="Ray GPUs per cell")
    x.add_argument("--max-retries", type=int, default=2, help="Ray: attempts after a worker dies mid-cell")
    x.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads every cell computes on, under either executor (recorded as torch_threads "
                        "and part of the cell key: on some CPUs another count gives other bits)")
    r.add_argument("--tune", type=int, default=0, metavar="N",
                   help="tune every method of the run with the same budget: N Optuna trials per cell over the "
                        "method's search space, each trained on the cell's train split and scored on its dev split "
                        "(never test), then the cell trains with the best values (default 0: the presets as they are)")
    r.add_argument("--tune-seed", type=int, default=None, metavar="S",
                   help="with --tune: tune each fold once, at seed S, and let every seed of the run train with those "
                        "values (default: each seed tunes on its own); values never serve another fold")
    r.add_argument("--rerun", action="store_true",
                   help="recompute cells that already have a finished run in the tracking store or the output "
                        "folder (default: reuse them)")
    r.set_defaults(func=cmd_run)

    sw = sub.add_parser("sweep", help="Optuna search of one method's hyperparameters on a task's dev split",
                        formatter_class=_Formatter)
    sw.add_argument("--method", required=True, help="the method whose search space is searched")
    sw.add_argument("--task", required=True, help="the task whose dev split is the objective")
    sw.add_argument("--trials", type=int, default=50, help="finished trials the study should hold")
    sw.add_argument("--storage", default=None,
                    help="journal:PATH (default journal:runs/sweeps/optuna.journal) or an RDB URL")
    sw.add_argument("--study", default=None, help="study name (default: METHOD-TASK-BACKBONE-PRESET)")
    sw.add_argument("--preset", default="default", choices=PRESETS, help="the preset the search space overrides")
    sw.add_argument("--fold", type=int, default=None, help="fold whose dev split is the objective (default: first)")
    sw.add_argument("--seed", type=int, default=0, help="method seed of every trial")
    sw.add_argument("--metric", default="ua", choices=["wa", "ua", "wf1", "macro_f1"], help="dev metric")
    sw.add_argument("--pruner", default="median", choices=["median", "hyperband", "none"],
                    help="Optuna pruner over the per-epoch dev reports")
    _add_task_options(sw)
    _add_backbone_options(sw)
    sw.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's local default)")
    sw.add_argument("--export", default=None, help="best-config file (default: runs/sweeps/STUDY.best.json)")
    sw.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads every trial trains on (as bench run's --threads)")
    sw.set_defaults(func=cmd_sweep)

    lb = sub.add_parser("leaderboard", help="leaderboard.html / .md / .tex from the runs logged to MLflow",
                        formatter_class=_Formatter)
    lb.add_argument("--output", required=True, help="folder for leaderboard.html, .md, .tex and .json")
    lb.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's local default)")
    lb.add_argument("--experiment", default="benchbench", help="MLflow experiment")
    lb.add_argument("--reference", default="lora", help="method the significance marks compare against")
    lb.add_argument("--runs", type=_csv, default=None, metavar="ID1,ID2",
                    help="only these `bench run` parent run ids (default: the latest run of every cell)")
    lb.add_argument("--preset", default=None, help="only cells of this preset")
    lb.add_argument("--tasks", type=_csv, default=None, help="only these tasks")
    lb.add_argument("--resamples", type=int, default=2000, help="dialogue-bootstrap resamples")
    lb.add_argument("--from-runs", type=_csv, default=None, metavar="DIR1,DIR2",
                    help="read these `bench run --output` folders or committed runs (results/NAME) instead of MLflow")
    lb.set_defaults(func=cmd_leaderboard)

    c = sub.add_parser("compare", help="paired statistics for a finished run's output folder (no rerun)",
                       formatter_class=_Formatter)
    c.add_argument("run_dir", help="a `bench run --output` folder (predictions.csv, summary.json)")
    c.add_argument("--reference", default="lora", help="method every other is compared with")
    c.add_argument("--all-pairs", action="store_true", help="compare every pair of methods instead")
    c.add_argument("--resamples", type=int, default=2000, help="dialogue-bootstrap resamples")
    c.set_defaults(func=cmd_compare)

    sp = sub.add_parser("speed", help="per-utterance inference cost of each method as a ratio to lora, the "
                                      "cost-vs-dialogue-length curve and encoder calls (untrained methods)",
                        formatter_class=_Formatter)
    sp.add_argument("--methods", type=_csv, default=["lora", "zero_shot", "full_context", "mal", "mac", "mag", "dpm",
                                                     "ttt", "rmt", "retrieval"],
                    help="comma-separated (lora, the reference, is always measured)")
    sp.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    sp.add_argument("--repeats", type=int, default=3, help="timed rounds; the best is kept")
    sp.add_argument("--dialogues", type=int, default=24, help="synthetic test dialogues of 10 turns timed")
    sp.add_argument("--no-curve", action="store_true", help="skip the cost-vs-dialogue-length curve")
    sp.add_argument("--output", default=None, metavar="FILE", help="also write the tables to FILE (markdown)")
    _add_backbone_options(sp)
    sp.set_defaults(func=cmd_speed)

    pr = sub.add_parser("probe", help="linear probe of a backbone's frozen audio features per fold (train: fit, "
                                      "dev: its regularisation, test: scored): what the audio path carries",
                        formatter_class=_Formatter)
    pr.add_argument("--tasks", type=_csv, required=True, help="comma-separated, e.g. emodb")
    pr.add_argument("--folds", type=_ints, default=None, help="subset of fold indices (default: all)")
    pr.add_argument("--preset", default="default", choices=PRESETS, help="the tasks' preset (their data composition)")
    pr.add_argument("--threads", type=int, default=1, help="torch CPU threads of the feature extraction "
                                                           "(and of lora's training under --projector)")
    pr.add_argument("--projector", action="store_true",
                    help="probe the trainable projector's output at its initialisation and after lora's training "
                         "of each fold and seed (replayed from the Phase-1 cache where that lora cell ran)")
    pr.add_argument("--seeds", type=_ints, default=[0], help="the lora seeds --projector probes")
    pr.add_argument("--output", default=None, metavar="FILE", help="also write the rows to FILE (csv)")
    _add_task_options(pr)
    _add_backbone_options(pr)
    pr.set_defaults(func=cmd_probe)

    ls = sub.add_parser("list", help="list registered methods, tasks or backbones", formatter_class=_Formatter)
    ls.add_argument("what", choices=["methods", "tasks", "backbones"], help="which registry")
    ls.set_defaults(func=cmd_list)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (KeyError, ValueError, FileNotFoundError, ImportError) as e:
        # the message (an OSError's first argument is its errno: its text then)
        print(f"bench: error: {e.args[0] if e.args and isinstance(e.args[0], str) else e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM (harness.Terminated): what finished is kept
        signal_name = "SIGTERM" if type(e).__name__ == "Terminated" else "interrupt"
        print(f"\nbench: stopped by {signal_name}; finished cells are kept (the same command resumes)",
              file=sys.stderr)
        return 143 if signal_name == "SIGTERM" else 130


if __name__ == "__main__":
    sys.exit(main())
