"""Speed, measured with pytest-benchmark (``pytest tests/test_benchmarks.py --benchmark-enable``)."""

import numpy as np
import torch

from benchbench.methods.mal import MemoryAsALayer


def test_feature_cache_hit(benchmark, backbone, tiny_task):
    u = tiny_task.folds()[0].test[0].utterances[0].input
    first = backbone.audio_embeddings(u)
    calls = backbone.encoder_calls
    emb = benchmark(backbone.audio_embeddings, u)
    assert torch.equal(emb, first) and backbone.encoder_calls == calls  # served from the cache


def test_mal_streaming_step(benchmark, backbone, tiny_task):
    mal = MemoryAsALayer(backbone, tiny_task.labels, MemoryAsALayer.make_config("smoke"), seed=0)
    d = tiny_task.folds()[0].test[0]
    probs = benchmark(mal.predict_dialogue, d.inputs())
    assert probs.shape == (len(d), len(tiny_task.labels)) and np.allclose(probs.sum(-1), 1, atol=1e-5)
