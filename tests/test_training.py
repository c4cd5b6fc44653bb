"""The shared training machinery: Phase 1 of every two-stage method is `lora`, at every preset."""

import numpy as np
import pytest
import torch

from benchbench.method import METHODS
from benchbench.training import (LORA_PRESETS, BestCheckpoint, LoRASettings, auxiliary_rng, phase1_presets)

TWO_STAGE = ["mal", "mac", "mag"]
PRESETS = ["smoke", "default", "paper"]


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", TWO_STAGE + ["full_context"])
def test_phase_one_settings_are_loras_at_every_preset(name, preset):
    lora = METHODS.get("lora").make_config(preset)
    assert METHODS.get(name).make_config(preset).lora == lora
    # a user's override still applies on top (and only there)
    assert METHODS.get(name).make_config(preset, {"lora": {"lr": 0.5}}).lora.lr == 0.5
    assert METHODS.get(name).make_config(preset).lora.lr == lora.lr


@pytest.mark.parametrize("preset,name", [("smoke", "mal"), ("default", "mal"), ("paper", "mal"),
                                         ("default", "mac"), ("default", "mag"), ("default", "full_context")])
def test_phase_one_trains_exactly_the_lora_method(backbone, tiny_task, preset, name):
    """Same seed and preset: the two-stage method's Phase-1 LoRA is bit-identical to `lora`'s, with
    the same dev curve, so (memory - LoRA) isolates the memory."""
    fold = tiny_task.folds()[0]
    lora_cls, cls = METHODS.get("lora"), METHODS.get(name)
    lora = lora_cls(backbone, tiny_task.labels, lora_cls.make_config(preset), seed=5)
    lora_report = lora.fit(fold.train, fold.dev)
    two = cls(backbone, tiny_task.labels, cls.make_config(preset, {"epochs": 0}), seed=5)
    two_report = two.fit(fold.train, fold.dev)
    assert two_report.curves["lora_dev_ua"] == lora_report.curves["lora_dev_ua"]
    assert len(lora_report.curves["lora_dev_ua"]) == lora.config.epochs
    assert two_report.selected == lora_report.selected and two_report.dev_score == lora_report.dev_score
    for k, p in lora.trained_parameters().items():
        assert torch.equal(p, two.lora_params[k]), k


def test_phase1_presets_refuse_a_copied_lora():
    presets = phase1_presets({"smoke": {"epochs": 1}})
    assert presets["smoke"] == {"lora": LORA_PRESETS["smoke"], "epochs": 1}
    assert presets["default"] == {"lora": LORA_PRESETS["default"]}
    with pytest.raises(ValueError, match="sets its own Phase-1 LoRA"):
        phase1_presets({"default": {"lora": {"lr": 1e-3}}})
    with pytest.raises(ValueError, match="no LoRA preset"):
        phase1_presets({"huge": {}})


def test_best_checkpoint_keeps_the_strictly_best_dev_epoch():
    w = torch.nn.Parameter(torch.zeros(2))
    best = BestCheckpoint.of_parameters({"w": w})
    for epoch, score in enumerate([0.4, 0.6, 0.6, 0.5]):
        with torch.no_grad():
            w.fill_(epoch)
        best.offer(score, epoch)
    assert best.epoch == 1 and best.score == 0.6  # a tie does not replace the earlier epoch
    best.restore()
    assert w.tolist() == [1.0, 1.0]
    # a finite starting score: the current tensors are kept unless beaten (Phase 2 vs Phase 1)
    phase2 = BestCheckpoint.of_parameters({"w": w}, score=0.7)
    with torch.no_grad():
        w.fill_(9)
    assert not phase2.offer(0.65, 0)
    phase2.restore()
    assert w.tolist() == [1.0, 1.0] and phase2.epoch is None
    with pytest.raises(RuntimeError, match="no dev score"):
        BestCheckpoint.of_parameters({"w": w}).restore()


def test_auxiliary_rng_leaves_the_main_stream_untouched():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    with auxiliary_rng(0):
        a = torch.rand(3)
    assert torch.equal(torch.rand(3), expected)  # the main stream continues as if nothing was drawn
    with auxiliary_rng(0):
        assert torch.equal(torch.rand(3), a)  # and the auxiliary stream is reproducible
    assert not torch.equal(a, expected)


def test_lora_settings_defaults_are_the_papers():
    s = LoRASettings()
    assert (s.r, s.alpha, s.lr, s.epochs, s.batch_size) == (32, 64, 2e-5, 3, 8)
    assert np.isclose(LORA_PRESETS["default"]["lr"], 1e-3)


@pytest.mark.parametrize("name", ["mal", "mag"])
def test_phase1_replays_the_lora_cell_bit_for_bit(name, tiny_task):
    """Phase 1 of a two-stage method is the lora cell's training of the same fold and seed: on a
    backbone that already ran it, it is replayed (parameters, curves, dev selection, RNG end states)
    and the method's predictions equal those of a fresh training, bit for bit."""
    from benchbench.backbones.qwen2_audio import tiny_qwen2_audio
    from benchbench.method import METHODS
    from benchbench.training import seed_everything

    fold = tiny_task.folds()[0]

    def run(bb, method):
        messages = []
        with bb.lend_lm():
            seed_everything(0)
            cls = METHODS.get(method)
            m = cls(bb, tiny_task.labels, cls.make_config("smoke"), seed=0)
            r = m.fit(fold.train, fold.dev, progress=lambda msg, d: messages.append(msg))
            return m.predict_dialogues([d.inputs() for d in fold.test]), r.curves, r.selected, messages

    fresh = run(tiny_qwen2_audio(seed=0), name)
    bb = tiny_qwen2_audio(seed=0)
    run(bb, "lora")
    assert len(bb.fit_cache) == 1
    replayed = run(bb, name)
    assert any("reused the identical training" in m for m in replayed[3])
    assert not any("reused" in m for m in fresh[3])
    assert all(np.array_equal(a, b) for a, b in zip(fresh[0], replayed[0]))
    assert fresh[1] == replayed[1] and fresh[2] == replayed[2]
    # another seed is another training: no replay
    with bb.lend_lm():
        seed_everything(1)
        m = METHODS.get(name)(bb, tiny_task.labels, METHODS.get(name).make_config("smoke"), seed=1)
        msgs = []
        m.fit(fold.train, fold.dev, progress=lambda msg, d: msgs.append(msg))
    assert not any("reused" in x for x in msgs) and len(bb.fit_cache) == 2


def test_phase1_is_replayed_from_disk_in_another_process(tiny_task, tmp_path, monkeypatch, caplog):
    """The on-disk Phase-1 cache: a fresh backbone (another process, a Ray worker, a later run) on the
    same cache folder replays the lora cell's training bit for bit; an LM with other weights, or an
    unreadable file, trains again."""
    from benchbench.backbones.qwen2_audio import tiny_qwen2_audio
    from benchbench.training import seed_everything

    monkeypatch.setenv("BENCHBENCH_PHASE1_CACHE", "1")
    fold = tiny_task.folds()[0]

    def run(bb, method):
        with bb.lend_lm():
            seed_everything(0)
            cls = METHODS.get(method)
            m = cls(bb, tiny_task.labels, cls.make_config("smoke"), seed=0)
            r = m.fit(fold.train, fold.dev)
            return m.predict_dialogues([d.inputs() for d in fold.test]), r.curves, r.selected, r.phase1_replayed

    monkeypatch.setenv("BENCHBENCH_PHASE1_CACHE", "0")
    fresh = run(tiny_qwen2_audio(seed=0, cache_dir=tmp_path / "off"), "mal")
    assert fresh[3] is False and not (tmp_path / "off" / "phase1").exists()
    monkeypatch.setenv("BENCHBENCH_PHASE1_CACHE", "1")
    assert run(tiny_qwen2_audio(seed=0, cache_dir=tmp_path / "c"), "lora")[3] is False
    (stored,) = (tmp_path / "c" / "phase1").rglob("*.pt")
    replayed = run(tiny_qwen2_audio(seed=0, cache_dir=tmp_path / "c"), "mal")  # a new backbone: nothing in memory
    assert replayed[3] is True
    assert all(np.array_equal(a, b) for a, b in zip(fresh[0], replayed[0]))
    assert fresh[1] == replayed[1] and fresh[2] == replayed[2]
    # the LM's weights are part of the key: one changed weight, another training
    other = tiny_qwen2_audio(seed=0, cache_dir=tmp_path / "c")
    with torch.no_grad():
        other.model.model.language_model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert other.key == tiny_qwen2_audio(seed=0).key and run(other, "mal")[3] is False
    # a truncated file (a killed writer) is not fatal: the training is repeated and the file rewritten
    stored.write_bytes(stored.read_bytes()[:100])
    with caplog.at_level("WARNING"):
        again = run(tiny_qwen2_audio(seed=0, cache_dir=tmp_path / "c"), "mal")
    assert again[3] is False and "unreadable" in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(fresh[0], again[0]))
    assert run(tiny_qwen2_audio(seed=0, cache_dir=tmp_path / "c"), "mal")[3] is True


@pytest.mark.parametrize("name, poisoned", [("lora", "lora"), ("full_context", "lora"), ("dpm", "lora"),
                                            ("mal", "memory"), ("mac", "memory"), ("mag", "memory")])
def test_a_non_finite_loss_fails_every_methods_epoch_loop_the_same_way(backbone, tiny_task, name, poisoned):
    """One epoch loop (training.run_epochs) for every trainable method: a NaN in a trained parameter
    (the task LoRA: lora's, full_context's, DPM's Phase 1; a memory branch: the memories' Phase 2) stops
    training at its first step with the same FloatingPointError, instead of training on NaN."""
    from benchbench.method import FitReport

    cls = METHODS.get(name)
    m = cls(backbone, tiny_task.labels, cls.make_config("smoke"), seed=0)
    fold = tiny_task.folds()[0]
    if poisoned == "lora":
        params = [p for k, p in m.trained_parameters().items() if "lora_A" in k and "temp" not in k]
    else:
        params = [p for b in m.branches.values() for p in b.parameters()]
    with torch.no_grad():
        params[0].fill_(float("nan"))
    phase = {"lora": name if name == "dpm" else "lora", "memory": name}[poisoned]
    with pytest.raises(FloatingPointError, match=rf"^{phase}: non-finite training loss \(nan\) at epoch 1, step 1$"):
        m.fit(fold.train, fold.dev)
    fresh = cls(backbone, tiny_task.labels, cls.make_config("smoke"), seed=0)
    assert isinstance(fresh.fit(fold.train, fold.dev), FitReport)  # and unpoisoned, it trains


def test_phase1_warms_up_where_a_random_projector_trains_and_nowhere_else():
    """With a projector among the parameters (``audio_projector.*``: the pretrained-LM backbone) every
    rate rises linearly over ``ceil(warmup * steps)`` steps; without one (the tiny backbones), or
    outside Phase 1, a constant rate, as before the schedule existed."""
    from torch import nn

    from benchbench.training import _optimizer

    params = {"lora_A": nn.Parameter(torch.zeros(2)), "audio_projector.w": nn.Parameter(torch.zeros(2))}
    s = LoRASettings(warmup=0.25)
    opt, schedule = _optimizer(params, 1e-3, s, steps=12, warmup=True)  # warm-up over 3 steps
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        schedule.step()
    assert seen == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3], rel=1e-12)
    assert len(opt.param_groups) == 1 and len(opt.param_groups[0]["params"]) == 2
    opt, schedule = _optimizer({"lora_A": params["lora_A"]}, 1e-3, s, steps=12, warmup=True)
    assert schedule is None and opt.param_groups[0]["lr"] == 1e-3
    opt, schedule = _optimizer(params, 1e-3, s, steps=12, warmup=False)
    assert schedule is None and opt.param_groups[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="warmup"):
        LoRASettings.from_overrides({"warmup": 1.5})


def test_the_alignment_stage_changes_nothing_where_the_projector_is_pretrained(backbone, tiny_task):
    """The tiny backbones' projector is frozen inside the feature cache: Phase 1 is the LoRA stage alone,
    whatever the alignment settings say (their cells differ only in the key)."""
    from benchbench.testing import fit_with_report

    a, ra = fit_with_report("lora", backbone, tiny_task, overrides={"align_epochs": 0})
    b, rb = fit_with_report("lora", backbone, tiny_task, overrides={"align_epochs": 3, "warmup": 0.5})
    assert not any(k.startswith("align") for k in rb.curves)
    assert ra.curves == rb.curves
    assert all(torch.equal(p, b.trained_parameters()[k]) for k, p in a.trained_parameters().items())
