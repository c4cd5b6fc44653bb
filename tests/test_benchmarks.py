"""Speed, measured with pytest-benchmark (``pytest tests/test_benchmarks.py --benchmark-enable``; in
the default run each benchmark runs once, untimed, and only the properties below are asserted).

The side-by-side table (ratios to ``lora``, the length curve, encoder calls) is ``bench speed``
(:mod:`benchbench.speed`); these tests pin what it measures: each method's inference as the harness
runs it, the LM tokens a dialogue costs against its length (full_context's grow with the square of
the turns until its budget, the memories' with the turns), and one encoder call per unique utterance.
"""

import numpy as np
import pytest
import torch

from benchbench import speed
from benchbench.metrics import stream_predict

METHODS = ["lora", "zero_shot", "full_context", "mal", "mac", "mag", "dpm"]


@pytest.fixture(scope="module")
def speed_task():
    return speed._task(n_test=4, n_turns=6, duration_s=0.64)


@pytest.fixture(scope="module")
def untrained(backbone, speed_task):
    return speed.build_methods(backbone, speed_task, METHODS)


def test_feature_cache_hit(benchmark, backbone, tiny_task):
    u = tiny_task.folds()[0].test[0].utterances[0].input
    first = backbone.audio_embeddings(u)
    calls = backbone.encoder_calls
    emb = benchmark(backbone.audio_embeddings, u)
    assert torch.equal(emb, first) and backbone.encoder_calls == calls  # served from the cache


@pytest.mark.parametrize("name", METHODS)
def test_inference_as_the_harness_runs_it(benchmark, name, untrained, speed_task):
    """One benchmark per method over the same dialogues (group ``inference``): their ratios are the
    table of ``bench speed``."""
    benchmark.group = "inference, tiny-qwen2-audio"
    test = speed_task.folds()[0].test
    probs = benchmark(stream_predict, untrained[name], test)
    assert [p.shape for p in probs] == [(len(d), len(speed_task.labels)) for d in test]
    assert all(np.allclose(p.sum(-1), 1, atol=1e-5) for p in probs)


def _lm_tokens(method, utterances) -> int:
    """Real (unpadded) token positions the method's LM blocks process to predict a dialogue."""
    seen = []

    def count(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        seen.append(h.shape[0] * h.shape[1])
    handle = method.lm.layers[0].register_forward_pre_hook(count, with_kwargs=True)
    try:
        method.predict_dialogue(utterances)
    finally:
        handle.remove()
    return sum(seen)


def test_cost_against_dialogue_length(backbone):
    """LM tokens per dialogue of N turns: full_context re-reads the history at every turn (slope
    near 2 in log-log until its budget), the memories and lora read each utterance once (slope 1)."""
    task = speed._task(n_test=1, n_turns=32, duration_s=0.64)
    built = speed.build_methods(backbone, task, ["lora", "mal", "full_context"])
    utts = task.folds()[0].test[0].inputs()
    turns = [4, 8, 16, 32]
    slopes = {}
    for name, m in built.items():
        tokens = [_lm_tokens(m, utts[:n]) for n in turns]
        slopes[name] = np.polyfit(np.log(turns), np.log(tokens), 1)[0]
    assert 0.9 < slopes["lora"] < 1.1 and 0.9 < slopes["mal"] < 1.1
    assert slopes["full_context"] > 1.5


def test_encoder_calls_per_unique_utterance():
    calls = speed.encoder_calls("tiny-qwen2-audio", n_dialogues=2, n_turns=3)
    assert calls == {"cold": 1.0, "warm": 0.0}


def test_latency_table_reports_ratios_to_lora(benchmark, backbone):
    table = benchmark.pedantic(speed.latency_table, args=(backbone, ["mal", "dpm"]),
                               kwargs=dict(n_dialogues=2, n_turns=3, duration_s=0.64, repeats=1), rounds=1)
    assert list(table.method) == ["lora", "mal", "dpm"] and table.x_lora.iloc[0] == 1.0
    assert (table.ms_per_utterance > 0).all() and np.isfinite(table.x_lora).all()
    benchmark.extra_info["x_lora"] = dict(zip(table.method, table.x_lora.round(2)))


@pytest.mark.slow
def test_latency_ratios_at_d1024(benchmark):
    """The table at the wide variant (``--backbone-set hidden_size=1024 --backbone-set
    num_hidden_layers=4``), where arithmetic rather than Python overhead sets the ratios."""
    from benchbench.backbones.qwen2_audio import tiny_qwen2_audio

    bb = tiny_qwen2_audio(seed=0, hidden_size=1024, num_hidden_layers=4)
    table = benchmark.pedantic(speed.latency_table, args=(bb, ["mal", "mag", "mac", "dpm"]),
                               kwargs=dict(n_dialogues=4, n_turns=6, duration_s=1.2, repeats=1), rounds=1)
    assert list(table.method) == ["lora", "mal", "mag", "mac", "dpm"]
    benchmark.extra_info["x_lora"] = dict(zip(table.method, table.x_lora.round(2)))
