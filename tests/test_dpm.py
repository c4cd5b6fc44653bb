"""DPM (Dynamic Parameter Memory, Algorithm 1): the mechanism pinned down."""

import dataclasses

import numpy as np
import pytest
import torch

from benchbench.backbone import Segment
from benchbench.method import METHODS
from benchbench.methods.dpm import DynamicParameterMemory, _UnitStream


@pytest.fixture(scope="module")
def dpm(backbone, tiny_task):
    m = DynamicParameterMemory(backbone, tiny_task.labels, DynamicParameterMemory.make_config("smoke"), seed=0)
    fold = tiny_task.folds()[0]
    m.fit(fold.train, fold.dev)
    return m


def _task_lora_only(m, utterances):
    with m.task_lora_only(), torch.no_grad():
        return [torch.softmax(m.lm(m.lm.batch([[Segment(
            m.backbone.audio_embeddings(u))]])).float(), -1).numpy()[0] for u in utterances]


def test_first_utterance_is_exactly_the_task_lora(dpm, tiny_task):
    for d in tiny_task.folds()[0].test:
        p = dpm.predict_dialogue(d.inputs())
        alone = _task_lora_only(dpm, d.inputs())
        assert np.array_equal(p[0], alone[0])       # a fresh temporary LoRA (B = 0) changes nothing
        assert not np.allclose(p[1:], np.stack(alone[1:]))  # ... and after an update it does


def test_task_lora_and_unit_head_untouched_by_evaluation(dpm, tiny_task):
    before = {k: v.detach().clone() for k, v in dpm.trained_parameters().items()}
    assert not any(p.requires_grad for p in dpm.trained_parameters().values())
    assert all(p.requires_grad for p in dpm.temp_params.values())
    for d in tiny_task.folds()[0].test:
        dpm.predict_dialogue(d.inputs())
    for k, v in dpm.trained_parameters().items():
        assert torch.equal(before[k], v), k
    assert not any(p.requires_grad for p in dpm.trained_parameters().values())  # still frozen after evaluation


def test_temporary_lora_never_crosses_a_dialogue_boundary(dpm, tiny_task):
    a, b = tiny_task.folds()[0].test[:2]
    alone = dpm.predict_dialogue(b.inputs())
    dpm.reset()
    for u in a.inputs():  # streaming dialogue a
        dpm.step(u)
    moved = any(not torch.equal(p, dpm.temp_init[n]) for n, p in dpm.temp_params.items())
    assert moved and dpm._opt.state  # dialogue a trained the temporary LoRA
    dpm.reset()
    assert all(torch.equal(p, dpm.temp_init[n]) for n, p in dpm.temp_params.items())
    assert not dpm._opt.state and dpm._streams[0].emb is None  # fresh optimizer, empty stream
    assert np.array_equal(dpm.predict_dialogue(b.inputs()), alone)


def test_non_finite_test_time_loss_is_reported_and_skipped(dpm, tiny_task, monkeypatch):
    d = tiny_task.folds()[0].test[0]
    ref = dpm.predict_dialogue(d.inputs())
    calls = {"n": 0}
    real = DynamicParameterMemory._unit_windows

    def poisoned(self, windows, prompts=()):
        calls["n"] += 1
        loss, logits = real(self, windows, prompts)
        return (loss * float("nan") if calls["n"] == 2 else loss), logits

    monkeypatch.setattr(DynamicParameterMemory, "_unit_windows", poisoned)
    dpm.test_time_issues.clear()
    p = dpm.predict_dialogue(d.inputs())
    assert np.all(np.isfinite(p)) and np.array_equal(p[:2], ref[:2])  # the run goes on
    (issue,) = dpm.test_time_issues
    assert issue["dialogue_id"] == d.dialogue_id and issue["utterance_id"] == d.inputs()[1].utterance_id
    assert "non-finite" in issue["problem"]


def test_units_and_windows(dpm, backbone, tiny_task):
    u = tiny_task.folds()[0].test[0].inputs()[0]
    emb, stream_emb, units = dpm._utterance_tokens(u)
    assert dpm.codebook.shape == (dpm.config.n_units, backbone.hidden_size)
    assert stream_emb.shape[0] == units.shape[0] == emb.shape[0] + 1
    assert units[-1] == dpm.config.n_units and int(units[:-1].max()) < dpm.config.n_units  # <audio_end> last
    # nearest centroid
    d2 = ((emb[:, None] - dpm.codebook[None]) ** 2).sum(-1)
    assert torch.equal(units[:-1], d2.argmin(-1))
    # Eq. 4: short streams shrink n_o and n_p
    c = dpm.config
    e, un = torch.zeros(100, 4), torch.arange(100)
    w, wu, k = dpm._phase1_window(e, un, 5)
    assert (w.shape[0], k) == (5, min(c.n_o, 5))
    w, wu, k = dpm._phase1_window(e, un, 90)
    assert (w.shape[0], k) == (c.n_o + c.n_p, c.n_o) and int(wu[-1]) == 89


def test_stream_keeps_only_the_prefix_it_reads():
    s = _UnitStream(keep=10)
    for i in range(6):
        start = s.append(torch.full((7, 2), float(i)), torch.full((7,), i))
        assert start <= 10 and s.emb.shape[0] == start + 7
        assert torch.equal(s.units[start:], torch.full((7,), i))


def test_config_errors_and_registry(backbone, tiny_task):
    assert "dpm" in METHODS.names()
    with pytest.raises(ValueError, match="n_r=0: expected >= 1"):
        DynamicParameterMemory(backbone, tiny_task.labels, dataclasses.replace(DynamicParameterMemory.make_config("smoke"), n_r=0))
    m = DynamicParameterMemory(backbone, tiny_task.labels, DynamicParameterMemory.make_config("smoke", {"n_units": 10_000}))
    with pytest.raises(ValueError, match="fewer than n_units"):
        m.fit_codebook(tiny_task.folds()[0].train)


def test_cost_is_counted(dpm, tiny_task):
    dpm.test_time_cost.clear()
    d = tiny_task.folds()[0].test[0]
    dpm.predict_dialogue(d.inputs())
    assert dpm.test_time_cost["test_time_updates"] == len(d) * dpm.config.test_time_steps
    assert dpm.test_time_cost["test_time_update_seconds"] > 0


def test_task_lora_only_is_dpm_without_memory(dpm, tiny_task):
    d = tiny_task.folds()[0].test[0]
    dpm.test_time_cost.clear()
    with dpm.task_lora_only():
        p = dpm.predict_dialogue(d.inputs())
    assert not dpm.test_time_cost  # no test-time update ran
    np.testing.assert_allclose(p, np.stack(_task_lora_only(dpm, d.inputs())), atol=1e-6)  # batched vs one by one
    assert all(q.requires_grad for q in dpm.temp_params.values())
    # a fresh temporary LoRA (B = 0) adds exactly nothing: turn 0 with the memory on is the task LoRA's
    # prediction bit for bit (compared in the same batch shape: one utterance, no padding)
    with dpm.task_lora_only():
        first = dpm.predict_dialogue(d.inputs()[:1])
    assert np.array_equal(dpm.predict_dialogue(d.inputs())[0], first[0])


def test_default_temp_lr_scales_with_the_lm_width():
    """The default preset's 3e-3 holds at D = 64 (bit for bit the tiny backbones' rate) and scales as
    64 / D: 5e-4 at the Whisper backbone's 384, about the paper's 5e-5 at 4096; the paper preset
    keeps 5e-5 as given."""
    from types import SimpleNamespace

    from benchbench.methods.dpm import DynamicParameterMemory as DPM

    rate = lambda preset, d: DPM.temp_lr.fget(SimpleNamespace(config=DPM.make_config(preset),
                                                              lm=SimpleNamespace(hidden_size=d)))
    assert rate("default", 64) == 3e-3
    assert rate("default", 384) == pytest.approx(5e-4) and rate("default", 4096) == pytest.approx(4.6875e-5)
    assert rate("paper", 384) == rate("paper", 4096) == 5e-5


def test_the_papers_order_updates_on_the_utterance_before_predicting_it(backbone, tiny_task, dpm):
    """``order="update_first"`` (Sec. 3.2, the paper preset's): y_i comes from the temporary LoRA already
    updated on utterance i's audio, so even the first prediction differs from the task LoRA alone; the
    update and its cost are the same as predict-first's; the label says which order ran."""
    paper = DynamicParameterMemory(backbone, tiny_task.labels,
                                   DynamicParameterMemory.make_config("smoke", {"order": "update_first"}), seed=0)
    paper.load_fitted_state(dpm.fitted_state())
    for k, v in dpm.trained_parameters().items():
        paper.trained_parameters()[k].data.copy_(v)
    d = tiny_task.folds()[0].test[0]
    p = paper.predict_dialogue(d.inputs())
    alone = _task_lora_only(paper, d.inputs())
    assert not np.allclose(p[0], alone[0])  # updated on utterance 0 before predicting it
    # the same updates in the same sequence as predict-first: after the whole dialogue both LoRAs are equal
    first = dpm.predict_dialogue(d.inputs())
    paper.reset()
    for u in d.inputs():
        paper.step(u)
    dpm.reset()
    for u in d.inputs():
        dpm.step(u)
    for n in dpm.temp_params:
        assert torch.allclose(paper.temp_params[n], dpm.temp_params[n], atol=1e-6)
    assert p.shape == first.shape
    assert DynamicParameterMemory.label(paper.config) == "dpm[utterance-prefix]"
    assert DynamicParameterMemory.label(dpm.config) == "dpm[predict-first,utterance-prefix]"
    assert DynamicParameterMemory.make_config("paper").order == "update_first"
    assert DynamicParameterMemory.make_config("default").order == "predict_first"
    with pytest.raises(ValueError, match="order must be one of"):
        DynamicParameterMemory.make_config("smoke", {"order": "sideways"})


def test_the_papers_emotion_prefix_reads_n_q_stream_tokens_across_utterances(backbone, tiny_task):
    """Eq. 5-6 (``emotion_prefix="history"``, the paper preset's): L_e and the prediction read the n_q
    stream tokens up to the current utterance's <audio_end>, the earlier utterances and their end
    markers included; fewer at the stream's start (Eq. 6); ``utterance`` reads the utterance alone."""
    cfg = DynamicParameterMemory.make_config("smoke", {"emotion_prefix": "history", "n_q": 12})
    m = DynamicParameterMemory(backbone, tiny_task.labels, cfg, seed=0)
    emb, stream = torch.randn(5, 8), torch.randn(20, 8)
    assert torch.equal(m._emotion_prompt(emb, stream), stream[8:19])       # 12 tokens, the last one the marker
    assert torch.equal(m._emotion_prompt(emb, stream[:6]), stream[:5])     # Eq. 6: n < n_q
    assert DynamicParameterMemory.label(cfg) == "dpm[predict-first]"  # history: only the order departs
    m.config.emotion_prefix = "utterance"
    assert torch.equal(m._emotion_prompt(emb, stream), emb)
    assert DynamicParameterMemory.label(DynamicParameterMemory.make_config("default")) == \
        "dpm[predict-first,utterance-prefix]"
    assert DynamicParameterMemory.make_config("paper").emotion_prefix == "history"
    with pytest.raises(ValueError, match="emotion_prefix"):
        DynamicParameterMemory.make_config("smoke", {"emotion_prefix": "all"})


def test_with_the_history_prefix_an_earlier_utterance_moves_a_later_prediction(backbone, tiny_task, dpm):
    """With the history prefix the prediction reads earlier audio directly: changing utterance 0 moves
    utterance 1's prediction even with the temporary LoRA switched off (no test-time update)."""
    cfg = DynamicParameterMemory.make_config("smoke", {"emotion_prefix": "history", "n_q": 64, "temp_lr": 1e-12})
    m = DynamicParameterMemory(backbone, tiny_task.labels, cfg, seed=0)
    m.load_fitted_state(dpm.fitted_state())
    for k, v in dpm.trained_parameters().items():
        m.trained_parameters()[k].data.copy_(v)
    d = tiny_task.folds()[0].test[0].inputs()
    other = tiny_task.folds()[0].test[1].inputs()
    a = m.predict_dialogue(d[:2])
    b = m.predict_dialogue([other[0], d[1]])
    assert not np.allclose(a[1], b[1])
