"""full_context: which earlier utterances enter the input, in what order, within the token budget."""

import pytest
import torch

from benchbench.methods.full_context import FullContext


def make(backbone, labels, **overrides):
    return FullContext(backbone, labels, FullContext.make_config("smoke", overrides), seed=0)


def two_speaker_dialogue(tiny_task):
    return next(d for f in tiny_task.folds() for d in f.test + f.train if len(set(d.speakers)) == 2
                and len({u.speaker for u in d.inputs()[:-1]}) == 2)


def test_dialogue_context_holds_every_earlier_utterance_and_speaker_context_only_the_speakers(backbone, tiny_task):
    d = two_speaker_dialogue(tiny_task)
    u = d.inputs()
    emb = {x.utterance_id: backbone.audio_embeddings(x) for x in u}
    for context, expected in (("dialogue", u[:-1]), ("speaker", [x for x in u[:-1] if x.speaker == u[-1].speaker])):
        segs = make(backbone, tiny_task.labels, context=context)._segments(u[:-1], u[-1])
        assert len(segs) == len(expected) + 1
        for seg, x in zip(segs, list(expected) + [u[-1]]):  # turn order, the current utterance last
            assert torch.equal(seg.audio, emb[x.utterance_id])
    # speaker tags stay those of the dialogue (S0/S1 by first appearance), not renumbered
    fc = make(backbone, tiny_task.labels, context="speaker")
    assert fc._segments(u[:-1], u[-1])[-1].speaker_tag == make(backbone, tiny_task.labels)._segments(u[:-1], u[-1])[-1].speaker_tag


def test_token_budget_keeps_the_most_recent_utterances(backbone, tiny_task):
    d = two_speaker_dialogue(tiny_task)
    u = d.inputs()
    t = backbone.audio_embeddings(u[0]).shape[0]
    segs = make(backbone, tiny_task.labels, max_context_tokens=2 * t)._segments(u[:-1], u[-1])
    assert len(segs) == 3 and torch.equal(segs[0].audio, backbone.audio_embeddings(u[-3]))


def test_unknown_context_raises(backbone, tiny_task):
    with pytest.raises(ValueError, match="context='everyone': expected one of dialogue, speaker"):
        make(backbone, tiny_task.labels, context="everyone")


def test_phase_2_trains_the_task_lora_further_on_context_and_dev_may_keep_phase_1(backbone, tiny_task):
    """Phase 1 is lora's training; with no Phase-2 epoch, or when no epoch beats Phase 1 on dev, the
    predictions are lora's bit for bit (each utterance alone); a Phase-2 winner reads the context."""
    import numpy as np

    from benchbench.method import METHODS

    fold = tiny_task.folds()[0]
    lora = METHODS.get("lora")(backbone, tiny_task.labels, METHODS.get("lora").make_config("smoke"), seed=0)
    lora.fit(fold.train, fold.dev)
    off = make(backbone, tiny_task.labels, epochs=0)
    rep = off.fit(fold.train, fold.dev)
    assert rep.selected["phase"] == 1 and off._context_off
    dialogues = [d.inputs() for d in fold.test]
    for a, b in zip(off.predict_dialogues(dialogues), lora.predict_dialogues(dialogues)):
        np.testing.assert_array_equal(a, b)
    on = make(backbone, tiny_task.labels, epochs=2, lr=5e-2)
    rep = on.fit(fold.train, fold.dev)
    assert len(rep.curves["full_context_dev_ua"]) == 2 and len(rep.curves["lora_dev_ua"]) == on.config.lora.epochs
    assert on._context_off == (rep.selected["phase"] == 1)
