"""Backbone wrapper: the cached path equals the model's own forward; the feature cache is keyed right."""

import numpy as np
import pytest
import torch

from benchbench.backbone import INSTRUCTION, Segment
from benchbench.backbones.qwen2_audio import tiny_qwen2_audio
from benchbench.data import UtteranceInput


def tone(f0=150.0, seconds=1.0, sr=16000, amp=0.3):
    t = np.arange(int(seconds * sr)) / sr
    return UtteranceInput(f"tone{f0}-{sr}", "d", 0, "s", (amp * np.sin(2 * np.pi * f0 * t)).astype(np.float32), sr)


@pytest.fixture(scope="module")
def af3():
    from benchbench.backbones.audio_flamingo_3 import tiny_audio_flamingo_3

    return tiny_audio_flamingo_3(seed=0)


@pytest.mark.parametrize("which,mask_kwarg", [("qwen2", "feature_attention_mask"), ("af3", "input_features_mask")])
def test_cached_path_matches_native_forward(which, mask_kwarg, backbone, af3):
    bb = backbone if which == "qwen2" else af3
    u = tone(seconds=1.2)
    emb = bb.audio_embeddings(u)
    assert emb.shape == (30, bb.hidden_size)  # 25 audio tokens per second
    assert bb.max_audio_tokens == 100          # a 4 s window
    lm = bb.new_lm(["anger", "happiness", "neutral", "sadness"])
    with torch.no_grad():
        ours = lm(lm.batch([[Segment(emb)]]))[0]
    text = "<|audio_bos|>" + "<|AUDIO|>" * emb.shape[0] + "<|audio_eos|> " + INSTRUCTION
    ids = bb.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    feats = bb.feature_extractor(u.waveform, sampling_rate=16000, return_attention_mask=True,
                                 padding="max_length", return_tensors="pt")
    with torch.no_grad():
        native = bb.model(input_ids=ids, input_features=feats.input_features,
                          **{mask_kwarg: feats.attention_mask}).logits[0, -1, lm.verbalizer_ids]
    torch.testing.assert_close(ours, native, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def ultravox():
    from benchbench.backbones.ultravox import tiny_ultravox

    return tiny_ultravox(seed=0)


@pytest.mark.parametrize("which", ["af3", "ultravox"])
@pytest.mark.parametrize("name", ["mal", "mac", "mag", "dpm", "ttt", "rmt", "retrieval"])
def test_memory_methods_attach_to_every_backbone_class(name, which, af3, ultravox, tiny_task):
    from benchbench.method import METHODS

    cls = METHODS.get(name)
    bb = {"af3": af3, "ultravox": ultravox}[which]
    m = cls(bb, tiny_task.labels, cls.make_config("smoke"), seed=0)
    fold = tiny_task.folds()[0]
    m.fit(fold.train[:3], fold.dev)
    p = m.predict_dialogue(fold.test[0].inputs())
    assert p.shape == (len(fold.test[0]), len(tiny_task.labels)) and np.allclose(p.sum(-1), 1, atol=1e-5)


def test_audio_positions_are_known(backbone):
    lm = backbone.new_lm(["anger", "sadness"])
    a, b = torch.randn(7, backbone.hidden_size), torch.randn(5, backbone.hidden_size)
    seq, spans = lm.build_sequence([Segment(a, "S0"), Segment(b, "S1")])
    assert [e - s for s, e in spans] == [7, 5]
    assert torch.equal(seq[spans[0][0]:spans[0][1]], a) and torch.equal(seq[spans[1][0]:spans[1][1]], b)


def test_feature_cache_is_reused_across_backbone_instances(tmp_path):
    u = tone(220.0)
    first = tiny_qwen2_audio(seed=0, cache_dir=tmp_path)
    e1 = first.audio_embeddings(u)
    assert first.encoder_calls == 1
    first.audio_embeddings(u)
    assert first.encoder_calls == 1  # memory hit
    second = tiny_qwen2_audio(seed=0, cache_dir=tmp_path)
    assert second.key == first.key
    assert torch.equal(second.audio_embeddings(u), e1) and second.encoder_calls == 0  # disk hit
    other = tiny_qwen2_audio(seed=1, cache_dir=tmp_path)  # other weights -> other key, recomputed
    assert other.key != first.key
    other.audio_embeddings(u)
    assert other.encoder_calls == 1


def test_corrupt_cache_file_is_recomputed(tmp_path):
    u = tone(300.0)
    bb = tiny_qwen2_audio(seed=0, cache_dir=tmp_path)
    e = bb.audio_embeddings(u)
    for f in tmp_path.rglob("*.safetensors"):
        f.write_bytes(b"truncated")
    fresh = tiny_qwen2_audio(seed=0, cache_dir=tmp_path)
    assert torch.equal(fresh.audio_embeddings(u), e) and fresh.encoder_calls == 1


def test_resampling_any_rate(backbone):
    e16 = backbone.audio_embeddings(tone(150.0, 2.0, 16000))
    e22 = backbone.audio_embeddings(tone(150.0, 2.0, 22050))
    assert e16.shape == e22.shape == (50, backbone.hidden_size)
    assert torch.nn.functional.cosine_similarity(e16.flatten(), e22.flatten(), dim=0) > 0.99


def test_bad_inputs_raise_with_the_utterance_named(backbone):
    with pytest.raises(ValueError, match="u-stereo"):
        backbone.audio_embeddings(UtteranceInput("u-stereo", "d", 0, "s", np.zeros((100, 2), np.float32), 16000))
    with pytest.raises(ValueError, match="u-empty"):
        backbone.audio_embeddings(UtteranceInput("u-empty", "d", 0, "s", np.zeros(0, np.float32), 16000))
    with pytest.raises(ValueError, match="spare label words are used up"):  # more labels than the tiny vocabulary has
        backbone.verbalizer_ids([f"emotion{i}" for i in range(13)])


def test_a_new_tasks_label_words_never_change_the_tiny_backbone(backbone):
    """A label outside the tiny vocabulary is scored through a spare label word: earlier tasks keep
    their verbalizers, the tokenizer and the backbone key (hence cached features and numbers) stay."""
    from benchbench.backbones.qwen2_audio import tiny_qwen2_audio
    from benchbench.backbones.tiny import LABEL_WORDS

    key, vocab = backbone.key, len(backbone.tokenizer)
    tok = backbone.tokenizer.convert_tokens_to_ids
    assert backbone.verbalizer_ids(["anger", "neutral"]) == [tok("anger"), tok("neutral")]
    ids = backbone.verbalizer_ids(["anger", "contempt", "anxiety", "neutral"])
    # the first spare words that are not labels of the task: LABEL_WORDS[1], LABEL_WORDS[3] (0 and 2 are labels)
    assert ids == [tok("anger"), tok(LABEL_WORDS[1]), tok(LABEL_WORDS[3]), tok("neutral")]
    assert len(set(ids)) == 4
    lm = backbone.new_lm(["anger", "contempt", "anxiety", "neutral"])
    assert lm.verbalizer_ids.tolist() == ids
    rebuilt = tiny_qwen2_audio(seed=0, cache_dir=backbone.cache_dir)
    assert rebuilt.key == key and len(rebuilt.tokenizer) == vocab


def test_backbone_registry_entries_are_typed_specs(backbone):
    from benchbench.backbone import BACKBONES, BackboneSpec, backbone_factory, backbone_spec, make_backbone
    from benchbench.backbones.qwen2_audio import tiny_qwen2_audio

    real, tiny = backbone_spec("qwen2-audio-7b"), backbone_spec("tiny-qwen2-audio")
    assert real.pretrained and real.hub_id == "Qwen/Qwen2-Audio-7B-Instruct" and "weights" in real.options
    assert not tiny.pretrained and tiny.options == ("hidden_size", "num_hidden_layers", "dtype", "device") and "random init" in tiny.needs
    with pytest.raises(ValueError, match="built from a config"):
        backbone_factory("tiny-qwen2-audio", {"weights": "/x"})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['revision'\]"):
        backbone_factory("qwen2-audio-7b", {"revision": "main"})
    # a contributor's backbone: one spec, registered by name (as a plugin's entry point would)
    BACKBONES.register("tiny-test-family", BackboneSpec("tiny-test-family", tiny_qwen2_audio, "nothing"))
    BACKBONES.register("not-a-spec", tiny_qwen2_audio)
    try:
        assert make_backbone("tiny-test-family", cache_dir=backbone.cache_dir).key == backbone.key
        with pytest.raises(TypeError, match="not a benchbench.backbone.BackboneSpec"):
            backbone_spec("not-a-spec")
    finally:
        BACKBONES._entries.pop("tiny-test-family")
        BACKBONES._entries.pop("not-a-spec")


def test_lm_size_options_build_the_wide_variant_and_leave_the_default_alone(backbone):
    """``--backbone-set hidden_size=N num_hidden_layers=N``: the tiny LM at another size (issue 17's
    d=1024 variant), checked before anything is built; the default is the network of every earlier number."""
    from benchbench.backbone import backbone_factory, backbone_label, make_backbone
    from benchbench.backbones.tiny import tiny_text_config, tiny_tokenizer

    assert tiny_text_config(tiny_tokenizer()) == dict(
        model_type="qwen2", vocab_size=len(backbone.tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        tie_word_embeddings=False)
    wide = make_backbone("tiny-qwen2-audio", {"hidden_size": 256, "num_hidden_layers": 3}, cache_dir=backbone.cache_dir)
    text = wide.model.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.intermediate_size) == (256, 3, 4, 512)
    assert wide.hidden_size == 256 and wide.key != backbone.key
    u = tone(220.0)  # the same audio tower config: audio tokens per second unchanged
    assert wide.audio_embeddings(u).shape == (backbone.audio_embeddings(u).shape[0], 256)
    assert backbone_label("tiny-qwen2-audio", {"num_hidden_layers": 3, "hidden_size": 256, "dtype": "bf16"}) == \
        "tiny-qwen2-audio+hidden_size=256+num_hidden_layers=3"
    for bad, msg in (({"hidden_size": 96}, "hidden_size=96: expected a multiple of 64"),
                     ({"hidden_size": "1024"}, "expected an integer"),
                     ({"num_hidden_layers": 0}, "num_hidden_layers=0: expected >= 1")):
        with pytest.raises(ValueError, match=msg):
            backbone_factory("tiny-ultravox", bad)


def _lm_fingerprint(bb):
    lm = bb.model.model.language_model
    mods = [(n, type(m).__name__, m.training) for n, m in lm.named_modules()]
    hooks = sum(len(getattr(m, a)) for m in lm.modules() for a in ("_forward_hooks", "_forward_pre_hooks"))
    state = {k: v.clone() for k, v in lm.state_dict().items()}
    grads = [p.requires_grad for p in lm.parameters()]
    return mods, hooks, state, grads, sorted(vars(lm))


@pytest.mark.parametrize("name", ["lora", "mal", "mac", "dpm", "full_context"])
def test_lent_lm_is_shared_and_restored_after_the_method(name, tiny_task):
    """Inside lend_lm() a method works on the backbone's own LM (no copy) and leaves nothing behind:
    no adapter, hook or attribute, the same weights and flags; its predictions equal those of the same
    method on a private copy."""
    from benchbench.method import METHODS
    from benchbench.testing import fitted

    bb = tiny_qwen2_audio(seed=0)
    before = _lm_fingerprint(bb)
    fold = tiny_task.folds()[0]
    with bb.lend_lm():
        m = fitted(name, bb, tiny_task)
        shared = bb.model.model.language_model.layers[0].mlp
        assert any(p.data_ptr() == next(shared.parameters()).data_ptr() for p in m.lm.parameters())  # no copy
        lent = [m.predict_dialogue(d.inputs()) for d in fold.test]
        with pytest.raises(RuntimeError, match="already lent"):
            bb.new_lm(tiny_task.labels)
    after = _lm_fingerprint(bb)
    assert before[0] == after[0] and before[1] == after[1] and before[3] == after[3] and before[4] == after[4]
    assert before[2].keys() == after[2].keys() and all(torch.equal(before[2][k], after[2][k]) for k in before[2])
    private = fitted(name, bb, tiny_task)  # outside lend_lm: a deep copy, as before
    for a, b in zip(lent, [private.predict_dialogue(d.inputs()) for d in fold.test]):
        assert np.array_equal(a, b)
    # and a failing method leaves the LM restored as well
    with pytest.raises(ZeroDivisionError):
        with bb.lend_lm():
            METHODS.get(name)(bb, tiny_task.labels, METHODS.get(name).make_config("smoke"), seed=0)
            1 / 0
    assert _lm_fingerprint(bb)[:2] == before[:2]


def test_a_backbones_own_lora_presets_reach_every_methods_task_lora(backbone, tiny_task):
    """``BackboneSpec.lora_presets``: values a backbone takes where the tiny LMs' presets do not fit. ``lora``
    and every method's Phase 1 take them alike (same budget), the method label stays the preset's (the
    backbone names the difference), the cell key changes, and a user's override still wins."""
    from benchbench.backbone import BACKBONES, BackboneSpec
    from benchbench.cells import Cell
    from benchbench.method import METHODS

    import copy

    BACKBONES.register("tiny-low-rate", BackboneSpec("tiny-low-rate", lambda **kw: None, "nothing",
                                                     lora_presets={"default": {"lr": 1e-4, "epochs": 2}}))
    try:
        low = copy.copy(backbone)  # the same network under another registered name, with its own LoRA values
        low.name = "tiny-low-rate"
        fold, manifest = tiny_task.folds()[0], tiny_task.manifest()

        def cell(method, bb, overrides=None):
            return Cell(method, tiny_task, fold, 0, bb, bb.name, "default", "default", overrides or {}, manifest)

        for method in ("lora", "mal", "dpm", "full_context"):
            plain, tuned = cell(method, backbone), cell(method, low)
            lora_of = (lambda c: c.config) if method == "lora" else (lambda c: c.config.lora)
            assert (lora_of(tuned).lr, lora_of(tuned).epochs) == (1e-4, 2)
            assert lora_of(plain).lr == METHODS.get(method).make_config("default").to_dict().get("lora", {}).get(
                "lr", METHODS.get("lora").make_config("default").lr)
            assert tuned.label == plain.label and "lr" not in tuned.label  # not a departure: the backbone's own
            assert tuned.key != plain.key
        assert cell("zero_shot", low).config == cell("zero_shot", backbone).config
        mine = cell("mal", low, {"lora": {"lr": 5e-4}})
        assert mine.config.lora.lr == 5e-4 and mine.config.lora.epochs == 2 and "lora.lr=0.0005" in mine.label
    finally:
        BACKBONES._entries.pop("tiny-low-rate")
