"""The synthetic speaker-baseline task: seeded, new speakers per dialogue, honest ceilings."""

import numpy as np
import pytest

from benchbench.task import TaskReference

from tests.conftest import same_emotion_rate
from benchbench.tasks.synthetic import (EMOTION_OFFSETS, SAMPLE_RATE, SyntheticProsodyTask, render_waveform,
                                        speaker_history_posterior)


def small(**kw):
    return SyntheticProsodyTask(preset="smoke", **kw)


def test_generation_is_seeded():
    assert small(seed=3).manifest()["sha256"] == small(seed=3).manifest()["sha256"]
    assert small(seed=3).manifest()["sha256"] != small(seed=4).manifest()["sha256"]


def test_every_dialogue_has_new_speakers_and_turns_in_order():
    t = small()
    f = t.folds()[0]
    seen = set()
    for d in f.train + f.dev + f.test:
        assert len(d.speakers) <= 2 and not (set(d.speakers) & seen)
        seen |= set(d.speakers)
        assert [u.input.turn for u in d.utterances] == list(range(len(d)))
        assert all(u.input.sample_rate == SAMPLE_RATE for u in d.utterances)


def test_ceilings_are_ordered_and_match_the_latents():
    t = SyntheticProsodyTask(preset="default", n_train=0, n_dev=0, n_test=200, duration_s=0.1)
    c = t.ceilings()
    assert c["chance"] < c["context_free"] < c["speaker_history"] < c["baseline_known"] <= 1.0
    # the Bayes rule applied to the generated test latents lands within binomial noise of the ceiling
    lat = [t.latents[u.utterance_id] for d in t.folds()[0].test for u in d.utterances]
    x = np.array([l["x"] for l in lat]); b = np.array([l["b"] for l in lat]); e = np.array([l["emotion"] for l in lat])
    nearest = lambda v: np.argmin(((v[:, None] - EMOTION_OFFSETS[None]) ** 2).sum(-1), 1)
    n = len(e)
    for acc, ref in ((np.mean(nearest(x) == e), c["context_free"]), (np.mean(nearest(x - b) == e), c["baseline_known"])):
        assert abs(acc - ref) < 4 * np.sqrt(ref * (1 - ref) / n)


def test_test_ceilings_apply_the_bayes_rules_to_the_test_split():
    t = SyntheticProsodyTask(preset="default", n_train=0, n_dev=0, n_test=60, duration_s=0.1)
    c, on_test = t.ceilings(), t.test_ceilings()
    test = t.folds()[0].test
    lat = [t.latents[u.utterance_id] for d in test for u in d.utterances]
    x = np.array([l["x"] for l in lat]); e = np.array([l["emotion"] for l in lat])
    nearest = np.argmin(((x[:, None] - EMOTION_OFFSETS[None]) ** 2).sum(-1), 1)
    assert on_test["context_free"] == pytest.approx(np.mean(nearest == e))  # exactly the rule on these items
    n = len(e)
    for k in ("context_free", "speaker_history"):  # within binomial noise of the population figures
        assert abs(on_test[k] - c[k]) < 4 * np.sqrt(c[k] * (1 - c[k]) / n)
    assert on_test["speaker_history"] > on_test["context_free"]
    ref = t.reference()
    assert ref.test_ceilings == on_test and ref.context_free == pytest.approx(c["context_free"])
    assert ref.to_dict()["ceilings"] == c  # summary.json keeps every ceiling, context_free first
    assert TaskReference.from_dict(ref.to_dict()) == ref
    with pytest.raises(ValueError, match="ceiling"):
        TaskReference.from_dict({"ceiling": {}})
    with pytest.raises(ValueError, match="fraction"):
        TaskReference(context_free=53.2)


def test_emotions_are_sticky_per_speaker():
    t = SyntheticProsodyTask(preset="default", n_train=0, n_dev=0, n_test=150, duration_s=0.1)
    assert abs(same_emotion_rate(t.folds()[0].test) - t.p_stay) < 0.05


def test_waveform_encodes_the_latents():
    rng = np.random.default_rng(0)
    quiet = render_waveform(np.array([0.0, -2.0, 0.0]), 1.0, rng)
    loud = render_waveform(np.array([0.0, 2.0, 0.0]), 1.0, rng)
    assert quiet.dtype == np.float32 and quiet.shape == (SAMPLE_RATE,)
    rms = lambda w: np.sqrt(np.mean(w ** 2))
    assert 20 * np.log10(rms(loud) / rms(quiet)) == pytest.approx(16.0, abs=1.0)  # 4 dB per z unit
    for z, f0 in ((0.0, 160.0), (4.0, 320.0)):
        w = render_waveform(np.array([z, 0.0, 2.0]), 1.0, rng)
        spec = np.abs(np.fft.rfft(w * np.hanning(len(w))))
        freqs = np.fft.rfftfreq(len(w), 1 / SAMPLE_RATE)
        peak = freqs[np.argmax(spec * (freqs > 60) * (freqs < 1.5 * f0))]
        assert peak == pytest.approx(f0, rel=0.06)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="unknown preset"):
        SyntheticProsodyTask(preset="huge")


def test_paper_preset_is_the_default_task():
    """`bench run --preset paper` (the methods' paper configs) runs on the default task's sizes
    (it raised "unknown preset 'paper'" before)."""
    assert SyntheticProsodyTask(preset="paper").sizes == SyntheticProsodyTask(preset="default").sizes


def test_speaker_history_posterior():
    rng = np.random.default_rng(0)
    nearest = lambda v: int(np.argmin(((v - EMOTION_OFFSETS) ** 2).sum(-1)))
    for _ in range(20):  # one utterance: the context-free rule (nearest offset)
        x = rng.normal(0, 2, 3)
        post = speaker_history_posterior(x[None], 1.5, 0.3, 0.5)
        assert post.shape == (4,) and post.sum() == pytest.approx(1.0) and int(np.argmax(post)) == nearest(x)
    # a speaker far from the population mean: alone, the last utterance looks like anger; after five
    # utterances at the same prosody with changing emotion, it is the speaker's baseline (neutral-ish)
    b = np.array([1.2, 1.2, 1.2])
    xs = np.array([b + EMOTION_OFFSETS[e] for e in (3, 1, 3, 2, 2)])
    assert int(np.argmax(speaker_history_posterior(xs[-1:], 1.5, 0.3, 0.5))) == 0
    assert int(np.argmax(speaker_history_posterior(xs, 1.5, 0.3, 0.5))) == 2


def test_generated_data_are_cached_on_disk_bit_for_bit(tmp_path, monkeypatch):
    """The second build reads ``$BENCHBENCH_CACHE/tasks/synthetic/<key>.npz``: the same waveforms,
    latents and manifest; another option or seed is another key."""
    from benchbench.tasks.synthetic import SyntheticProsodyTask

    monkeypatch.setenv("BENCHBENCH_CACHE", str(tmp_path))
    opts = dict(preset="smoke", n_train=3, n_dev=1, n_test=2, n_turns=4, duration_s=0.4)
    first = SyntheticProsodyTask(**opts)
    fresh = first.folds()[0]
    (path,) = (tmp_path / "tasks" / "synthetic").glob("*.npz")
    assert path.stem == first.cache_key
    again = SyntheticProsodyTask(**opts)
    again_fold = again.folds()[0]
    assert again.manifest() == first.manifest()
    for a, b in zip(fresh.train + fresh.dev + fresh.test, again_fold.train + again_fold.dev + again_fold.test):
        assert a.dialogue_id == b.dialogue_id and [u.label for u in a.utterances] == [u.label for u in b.utterances]
        for u, v in zip(a.utterances, b.utterances):
            assert (u.input.utterance_id, u.input.turn, u.input.speaker) == (v.input.utterance_id, v.input.turn,
                                                                             v.input.speaker)
            assert u.input.waveform.dtype == v.input.waveform.dtype and np.array_equal(u.input.waveform,
                                                                                      v.input.waveform)
            assert np.array_equal(first.latents[u.utterance_id]["x"], again.latents[u.utterance_id]["x"])
    assert again.test_ceilings() == first.test_ceilings()
    assert SyntheticProsodyTask(**{**opts, "seed": 1}).cache_key != first.cache_key
    assert SyntheticProsodyTask(**{**opts, "sigma_n": 0.4}).cache_key != first.cache_key
