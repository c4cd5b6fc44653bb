"""Paper scale, measured: every method's paper preset on a paper backbone's architecture (random weights).

``python -m benchbench.tools.paper_scale --data-dir DIR --out OUT`` runs, in one process, for each of
``lora, mal, mac, mag, dpm, full_context`` (``--methods``): one cell (fold 0, seed 0) of the ``iemocap``
task on ``DIR`` (a real ``IEMOCAP_full_release`` or one written by ``python -m benchbench.tools.fixtures
iemocap``) with ``--preset paper``, on ``--backbone`` (``qwen2-audio-7b``) built by ``--random-init`` at
its published sizes on ``--device`` in ``--dtype`` (default ``cuda``, ``bf16``). Each cell goes through
the harness's own :func:`benchbench.cells.compute_cell` (fit, stream the test split, score), so what is
measured is what ``bench run`` does; only MLflow is left out. Every epoch count is cut to ``--epochs``
(1): **the figures are costs per epoch, not accuracy** (random weights: the accuracy means nothing).
Then the inference latency of every method side by side (:func:`benchbench.speed.latency_table`, the
``bench speed`` measurement) on the same backbone, unless ``--no-speed``.

It writes ``OUT/paper_scale.csv`` (one row per method: status, error, epochs, fit seconds and seconds
per epoch, training utterances, inference ms per utterance, ``peak_cuda_mb``, trained parameters),
``OUT/speed.csv``, ``OUT/machine.json`` and ``OUT/paper_scale.md`` (the tables as markdown), each row
written as soon as it is known, so a run cut short keeps what it measured. A method that fails (an
out-of-memory, a device mismatch) is a row with its error; the others still run.

Dry run on a CPU at reduced depth and width (what the tests do)::

    python -m benchbench.tools.paper_scale --data-dir FIXTURE --out OUT --device cpu --dtype fp32 \\
        --backbone-set lm_layers=1 --backbone-set lm_width=128 ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import pandas as pd
import torch

METHODS = ("lora", "mal", "mac", "mag", "dpm", "full_context")
TWO_STAGE_EPOCHS = ("mal", "mac", "mag", "full_context")
"""Methods whose ``epochs`` is Phase 2's: Phase 1 is ``lora``'s training, replayed from the lora cell."""


def epoch_overrides(methods, epochs: int) -> dict[str, dict]:
    """``--set`` overrides that cut every epoch count of ``methods`` to ``epochs``: the task LoRA's
    (``lora.epochs``; ``lora``'s own ``epochs``), and Phase 2's for the two-stage methods; ``lora``'s
    and the two-stage methods' Phase 1 stay identical, so Phase 1 is trained once and replayed."""
    out = {}
    for m in methods:
        if m == "lora":
            out[m] = {"epochs": epochs}
        elif m in TWO_STAGE_EPOCHS:
            out[m] = {"lora": {"epochs": epochs}, "epochs": epochs}
        else:
            out[m] = {"lora": {"epochs": epochs}}
    return out


def _sync(device: str) -> None:
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def machine() -> dict:
    """Where the run ran: the recorder's machine facts (:func:`benchbench.tools.publish.machine`: CPU model,
    cores, platform, Python, torch build), the CUDA and transformers versions, the GPU's name and memory,
    and the commit (``git rev-parse HEAD``, or ``$BENCHBENCH_COMMIT`` where the tree travels without its
    git folder)."""
    import transformers

    from benchbench.tools.publish import _git
    from benchbench.tools.publish import machine as host

    out = {**host(), "cuda": torch.version.cuda, "transformers": transformers.__version__,
           "commit": os.environ.get("BENCHBENCH_COMMIT") or _git("rev-parse", "HEAD") or None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1))
    return out


def _row(record, method: str, epochs: int, n_train: int, build_s: float) -> dict:
    r = record.row
    row = {"method": method, "status": r.get("status", "ok"), "error": r.get("error", ""),
           "epochs": epochs, "fit_seconds": r.get("fit_seconds"), "train_utterances": n_train,
           "eval_ms_per_utterance": r.get("eval_ms_per_utterance"), "peak_cuda_mb": r.get("peak_cuda_mb"),
           "peak_rss_mb": r.get("peak_rss_mb"), "trained_parameters": r.get("trained_parameters"),
           "phase1_replayed": r.get("phase1_replayed"), "selected_phase": r.get("selected_phase"),
           "backbone_build_seconds": build_s}
    if row["fit_seconds"] is not None:
        row["fit_seconds_per_epoch"] = row["fit_seconds"] / epochs
    return row


def format_markdown(table: pd.DataFrame, speed: pd.DataFrame | None, info: dict) -> str:
    """The two tables as markdown, under a line naming the backbone, the device and the settings."""
    from benchbench.speed import format_table

    cols = [c for c in ("method", "status", "epochs", "fit_seconds_per_epoch", "train_utterances",
                        "eval_ms_per_utterance", "peak_cuda_mb", "trained_parameters") if c in table.columns]
    shown = table[cols].copy()
    for c in ("peak_cuda_mb", "trained_parameters"):
        if c in shown:
            shown[c] = shown[c].map(lambda v: "" if pd.isna(v) else f"{v:,.0f}")
    out = [f"backbone {info['backbone']} ({info['parameters'] / 1e9:.2f}B parameters, {info['dtype']} on "
           f"{info.get('gpu') or info['device']}), --preset paper, iemocap fold 0, seed 0, every epoch count cut to "
           f"{info['epochs']}: costs per epoch, not accuracy (random weights)", "",
           f"{info['utterances']} utterances of {info['seconds_per_utterance']:.1f} s on average, "
           f"{info['audio_tokens_per_utterance']:.0f} audio tokens each; audio encoder "
           f"{info['encoder_ms_per_utterance']:.1f} ms per utterance, once (cached; in no method's figures); "
           f"backbone built in {info['backbone_build_seconds']:.0f} s", "", format_table(shown, ".2f")]
    failed = table[table["status"] != "ok"]
    for _, r in failed.iterrows():
        out += ["", f"{r['method']} failed: {r['error']}"]
    if speed is not None:
        out += ["", f"Per-utterance inference, every method built at once (untrained, paper preset, "
                f"{info['speed_dialogues']} synthetic dialogues x 10 turns of 1.2 s, best of {info['speed_repeats']}):",
                "", format_table(speed, ".2f")]
    return "\n".join(out)


def run(data_dir: str, out: Path, backbone: str = "qwen2-audio-7b", methods=METHODS, epochs: int = 1,
        dtype: str = "bf16", device: str = "cuda", sizes: dict | None = None, speed: bool = True,
        speed_dialogues: int = 8, speed_repeats: int = 2, cache_dir: str | None = None,
        overrides: dict | None = None) -> pd.DataFrame:
    """Measure ``methods`` as the module docstring says; returns the per-method table (also written).
    ``overrides``: method -> nested config overrides (``--set``), applied over the epoch cut.

    Raises:
        ValueError: a bad backbone option or data folder (before anything is measured).
    """
    from benchbench.backbone import backbone_label
    from benchbench.cells import compute_cell
    from benchbench.harness import RunSpec, _cells, prepare
    from benchbench.method import _deep_merge

    out.mkdir(parents=True, exist_ok=True)
    methods = list(methods)
    options = {"random_init": True, "dtype": dtype, "device": device, **(sizes or {})}
    spec = RunSpec(methods=methods, tasks=["iemocap"], backbone=backbone, seeds=[0], folds=[0], preset="paper",
                   data_dir=data_dir, method_overrides=_deep_merge(epoch_overrides(methods, epochs), overrides or {}),
                   backbone_options=options,
                   output=str(out), threads=min(16, os.cpu_count() or 1))
    info = {"backbone": backbone_label(backbone, options), "dtype": dtype, "device": device, "epochs": epochs,
            "methods": methods, "command": " ".join(sys.argv), **machine()}
    if cache_dir:
        os.environ["BENCHBENCH_CACHE"] = cache_dir
    t0 = time.perf_counter()
    tasks, backbones = prepare(spec)
    build_s = time.perf_counter() - t0
    task, bb = tasks["iemocap"], backbones["iemocap"]
    info["parameters"] = sum(p.numel() for p in bb.model.parameters())
    info["backbone_build_seconds"] = build_s
    if torch.cuda.is_available() and device.startswith("cuda"):
        info["backbone_cuda_mb"] = torch.cuda.memory_allocated() / 2**20
    (out / "machine.json").write_text(json.dumps(info, indent=2))
    print(f"built {info['backbone']} in {build_s:.1f} s ({info['parameters'] / 1e9:.2f}B parameters)", flush=True)
    fold = [f for f in task.folds() if f.index == 0]
    n_train = sum(len(d) for d in fold[0].train)
    # the audio encoder runs once per utterance (features cached); warm it here, timed apart, so that no
    # method's figures carry it
    utts = [u.input for split in (fold[0].train, fold[0].dev, fold[0].test) for d in split for u in d.utterances]
    _sync(device)
    t = time.perf_counter()
    tokens = [bb.audio_features(u).shape[0] for u in utts]
    _sync(device)
    info.update(encoder_ms_per_utterance=1000 * (time.perf_counter() - t) / len(utts), utterances=len(utts),
                audio_tokens_per_utterance=sum(tokens) / len(tokens),
                seconds_per_utterance=sum(u.duration_s for u in utts) / len(utts))
    (out / "machine.json").write_text(json.dumps(info, indent=2))
    print(f"audio encoder: {info['encoder_ms_per_utterance']:.1f} ms per utterance over {len(utts)} utterances "
          f"({info['audio_tokens_per_utterance']:.0f} audio tokens each on average)", flush=True)
    rows = []
    for cell in _cells(spec, task, task.manifest(), bb, fold, methods, [0]):
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        t = time.perf_counter()
        record = compute_cell(cell, lambda msg, d: print(f"  [{cell.method}] {msg} "
                                                         + " ".join(f"{k}={v:.3f}" for k, v in d.items()), flush=True))
        rows.append(_row(record, cell.method, epochs, n_train, build_s))
        print(f"{cell.method}: {rows[-1]['status']} in {time.perf_counter() - t:.1f} s "
              f"{rows[-1]['error'][:300]}", flush=True)
        pd.DataFrame(rows).to_csv(out / "paper_scale.csv", index=False)
    table = pd.DataFrame(rows)
    speed_table = None
    if speed:
        from benchbench.speed import latency_table

        info.update(speed_dialogues=speed_dialogues, speed_repeats=speed_repeats)
        try:
            speed_table = latency_table(bb, ["lora", "zero_shot", *methods],
                                        n_dialogues=speed_dialogues, repeats=speed_repeats, preset="paper",
                                        overrides=overrides)
            speed_table.to_csv(out / "speed.csv", index=False)
        except Exception as e:  # noqa: BLE001 - the per-method table above is already written
            info["speed_error"] = f"{type(e).__name__}: {e}"
            print(f"speed: failed: {info['speed_error']}", flush=True)
    (out / "machine.json").write_text(json.dumps(info, indent=2))
    text = format_markdown(table, speed_table, info)
    (out / "paper_scale.md").write_text(text + "\n")
    print(text, flush=True)
    return table


def main(argv: list[str] | None = None) -> int:
    from benchbench.cli import _key_value, _override, nest_overrides

    p = argparse.ArgumentParser(prog="python -m benchbench.tools.paper_scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="an IEMOCAP_full_release folder (or its parent)")
    p.add_argument("--out", required=True)
    p.add_argument("--backbone", default="qwen2-audio-7b", choices=["qwen2-audio-7b", "audio-flamingo-3",
                                                                    "ultravox-v0.4"])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--epochs", type=int, default=1, help="every epoch count of every method (default 1)")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--backbone-set", dest="sizes", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="a size override (lm_layers=2, ...: benchbench.backbones.paper_scale.SIZE_OPTIONS)")
    p.add_argument("--set", dest="overrides", type=_override, action="append", default=[],
                   metavar="METHOD.KEY=VALUE", help="a method config value over the paper preset (repeatable)")
    p.add_argument("--no-speed", dest="speed", action="store_false", help="skip the latency table")
    p.add_argument("--speed-dialogues", type=int, default=8)
    p.add_argument("--speed-repeats", type=int, default=2)
    p.add_argument("--cache-dir", default=None, help="feature and Phase-1 cache (default $BENCHBENCH_CACHE)")
    a = p.parse_args(argv)
    table = run(a.data_dir, Path(a.out), a.backbone, [m for m in a.methods.split(",") if m], a.epochs, a.dtype,
                a.device, dict(a.sizes), a.speed, a.speed_dialogues, a.speed_repeats, a.cache_dir,
                nest_overrides(a.overrides))
    return 0 if (table["status"] == "ok").all() else 1


if __name__ == "__main__":
    raise SystemExit(main())
