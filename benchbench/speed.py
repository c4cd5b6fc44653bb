"""What the methods cost at inference, side by side: ``bench speed``.

Three measurements, each taken in one process so that their ratios are meaningful (absolute times on a
shared CPU are not):

* :func:`latency_table`: per-utterance inference time of every method, untrained (default preset,
  seed 0), on the same synthetic test dialogues, predicted the way the harness does
  (:func:`benchbench.metrics.stream_predict`: :meth:`ContextMethod.predict_dialogues` over the whole
  split, features from the warm cache), and its ratio to ``lora`` measured the same way. Methods are
  timed in turn, ``repeats`` rounds, best round kept (the least disturbed by other load).
* :func:`length_curve`: milliseconds per dialogue for dialogues of N = 4..64 turns (prefixes of one
  long dialogue) and the log-log slope of time against N: about 1 for a method whose per-utterance
  cost is flat (the memories), about 2 for one that re-reads the whole history at every turn
  (``full_context`` until its context budget).
* :func:`encoder_calls`: audio-encoder forward passes per unique utterance, cold (an empty feature
  cache: 1.0) and warm (0).

``dpm`` needs its unit codebook before it can stream: it is fitted (k-means only, seconds) on the
training split of the same synthetic task; nothing else is trained.
"""

from __future__ import annotations

import tempfile
import time
from typing import Sequence

import numpy as np
import pandas as pd
import torch

DEFAULT_METHODS = ("lora", "zero_shot", "full_context", "mal", "mac", "mag", "dpm", "ttt", "rmt", "retrieval")


def _task(n_test: int, n_turns: int, duration_s: float, seed: int = 0):
    from .task import TASKS

    return TASKS.get("synthetic")(preset="smoke", seed=seed, n_train=4, n_dev=1, n_test=n_test,
                                  n_turns=n_turns, duration_s=duration_s)


def build_methods(backbone, task, methods: Sequence[str], preset: str = "default", seed: int = 0,
                  overrides: dict | None = None) -> dict:
    """Untrained methods by name (``dpm`` with its k-means codebook fitted on ``task``'s training split),
    each under ``preset`` and its ``overrides`` (method -> nested config values, as ``--set``)."""
    from .method import METHODS

    built = {}
    train = task.folds()[0].train
    for name in methods:
        cls = METHODS.get(name)
        m = cls(backbone, task.labels, cls.make_config(preset, (overrides or {}).get(name)), seed=seed)
        if hasattr(m, "fit_codebook"):
            m.fit_codebook(train)
        built[name] = m
    return built


def _time_dialogues(method, dialogues) -> float:
    """Seconds to predict ``dialogues`` as the harness does (:func:`benchbench.metrics.stream_predict`)."""
    from .metrics import stream_predict

    t0 = time.perf_counter()
    stream_predict(method, dialogues)
    return time.perf_counter() - t0


def latency_table(backbone, methods: Sequence[str] = DEFAULT_METHODS, n_dialogues: int = 24, n_turns: int = 10,
                  duration_s: float = 1.2, repeats: int = 3, preset: str = "default",
                  overrides: dict | None = None) -> pd.DataFrame:
    """Per-utterance inference milliseconds of each method and its ratio to ``lora`` (rows in
    ``methods`` order; ``lora`` is added when missing). ``n_dialogues`` synthetic test dialogues of
    ``n_turns`` utterances of ``duration_s`` seconds. On a CUDA backbone (``--device cuda``) also
    ``peak_cuda_mb``: the most GPU memory allocated while that method predicted the split (the
    backbone, every built method's own parameters and its activations)."""
    methods = list(dict.fromkeys(["lora", *methods]))
    task = _task(n_dialogues, n_turns, duration_s)
    dialogues = task.folds()[0].test
    for d in dialogues:  # warm the feature cache: the table is about the methods, not the encoder
        for u in d.utterances:
            backbone.audio_features(u.input)
    built = build_methods(backbone, task, methods, preset, overrides=overrides)
    n_utt = sum(len(d) for d in dialogues)
    for m in built.values():  # one untimed pass: lazy initialisation, allocator warm-up
        _time_dialogues(m, dialogues[:1])
    best = {name: np.inf for name in methods}
    peak = {name: 0.0 for name in methods}
    cuda = torch.cuda.is_available() and next(backbone.model.parameters()).is_cuda
    for _ in range(repeats):
        for name in methods:
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            best[name] = min(best[name], _time_dialogues(built[name], dialogues))
            if cuda:
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated() / 2**20)
    ms = {name: 1000 * best[name] / n_utt for name in methods}
    table = pd.DataFrame({"method": methods, "ms_per_utterance": [ms[n] for n in methods],
                          "x_lora": [ms[n] / ms["lora"] for n in methods]})
    if cuda:  # every method built and alive at once: the backbone and all methods are in every figure
        table["peak_cuda_mb"] = [peak[n] for n in methods]
    return table


def length_curve(backbone, methods: Sequence[str] = DEFAULT_METHODS, turns: Sequence[int] = (4, 8, 16, 32, 64),
                 duration_s: float = 1.2, repeats: int = 2, preset: str = "default") -> pd.DataFrame:
    """Milliseconds per dialogue against its length N (prefixes of one ``max(turns)``-turn dialogue),
    one row per method with a column per N and ``slope``: the least-squares slope of log(time) on
    log(N)."""
    task = _task(1, max(turns), duration_s)
    dialogue = task.folds()[0].test[0]
    for u in dialogue.utterances:
        backbone.audio_features(u.input)
    built = build_methods(backbone, task, methods, preset)
    inputs = dialogue.inputs()
    rows = []
    for name in methods:
        m = built[name]
        m.predict_dialogue(inputs[: min(turns)])
        times = []
        for n in turns:
            t = np.inf
            for _ in range(repeats):
                t0 = time.perf_counter()
                m.predict_dialogue(inputs[:n])
                t = min(t, time.perf_counter() - t0)
            times.append(1000 * t)
        slope = float(np.polyfit(np.log(turns), np.log(times), 1)[0])
        rows.append({"method": name, **{f"N={n}": t for n, t in zip(turns, times)}, "slope": slope})
    return pd.DataFrame(rows)


def encoder_calls(backbone_name: str, backbone_options: dict | None = None, n_dialogues: int = 2,
                  n_turns: int = 4) -> dict[str, float]:
    """Audio-encoder forward passes per unique utterance for a fresh backbone with an empty on-disk
    feature cache (``cold``), then for a second fresh backbone on the same cache (``warm``)."""
    from .backbone import make_backbone

    task = _task(n_dialogues, n_turns, 1.0)
    utts = [u.input for d in task.folds()[0].test for u in d.utterances]
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        for phase in ("cold", "warm"):
            bb = make_backbone(backbone_name, backbone_options, cache_dir=cache)
            for u in utts + utts:  # every utterance twice: the second read is the in-memory cache's
                bb.audio_features(u)
            out[phase] = bb.encoder_calls / len(utts)
    return out


def format_table(df: pd.DataFrame, floatfmt: str = ".2f") -> str:
    """A markdown table of ``df`` (numbers formatted with ``floatfmt``)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        lines.append("| " + " | ".join(format(v, floatfmt) if isinstance(v, float) else str(v) for v in r) + " |")
    return "\n".join(lines)


def main(backbone: str = "tiny-qwen2-audio", backbone_options: dict | None = None,
         methods: Sequence[str] = DEFAULT_METHODS, threads: int | None = 1, curve: bool = True,
         repeats: int = 3, n_dialogues: int = 24) -> str:
    """The three measurements as markdown, with the machine and the settings (``bench speed``)."""
    import os
    import platform

    from .backbone import backbone_label, make_backbone

    if threads:
        torch.set_num_threads(threads)
    bb = make_backbone(backbone, backbone_options)
    label = backbone_label(backbone, backbone_options or {}, bb.autocast)
    w = next(bb.model.parameters())
    where = torch.cuda.get_device_name(w.device) if w.is_cuda else "CPU"
    out = [f"backbone {label} (LM width {bb.hidden_size}, {str(w.dtype).replace('torch.', '')} on {where}); torch "
           f"{torch.__version__}, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}, "
           f"{os.cpu_count()} CPUs",
           "", f"Per-utterance inference (untrained, default preset, {n_dialogues} synthetic dialogues x 10 turns "
           f"of 1.2 s, best of {repeats}):", "",
           format_table(latency_table(bb, methods, n_dialogues=n_dialogues, repeats=repeats))]
    if curve:
        out += ["", "Milliseconds per dialogue against its length N, and the log-log slope:", "",
                format_table(length_curve(bb, methods), ".1f")]
    calls = encoder_calls(backbone, backbone_options)
    out += ["", f"Encoder calls per unique utterance: cold {calls['cold']:.2f}, warm {calls['warm']:.2f}"]
    return "\n".join(out)
