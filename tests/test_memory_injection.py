"""MAC (Eq. 4) and MAG (Eq. 5) against MAL (Eq. 9): one branch, three injections."""

import dataclasses

import numpy as np
import pytest
import torch

from benchbench.backbone import Segment
from benchbench.testing import PREFIX_ATOL
from benchbench.method import METHODS
from benchbench.methods.mac import MACBranch, MACConfig, MemoryAsContext
from benchbench.methods.mag import MAGBranch, MAGConfig, MemoryAsGating
from benchbench.methods.mal import MALBranch, MALConfig


def make(name, backbone, labels, **overrides):
    cls = METHODS.get(name)
    return cls(backbone, labels, cls.make_config("smoke", overrides), seed=0)


def _capture(block, store):
    def hook(module, args, kwargs):
        store.append((args[0].shape[1], kwargs["position_ids"].clone()))
    return block.register_forward_pre_hook(hook, with_kwargs=True)


def test_mac_lengthens_the_sequence_and_shifts_positions(backbone, tiny_task):
    mac = make("mac", backbone, tiny_task.labels)
    assert mac.layer_ids == [0]  # Eq. 4: at the language-model input
    u = tiny_task.folds()[0].test[0].inputs()[0]
    emb = backbone.audio_embeddings(u)
    T, n_p = emb.shape[0], mac.config.n_persistent
    seen_host, seen_mac = [], []
    h = _capture(mac.lm.layers[1], seen_host)
    with torch.no_grad():
        batch = mac.lm.batch([[Segment(emb)]])
        mac.lm(batch)
    h.remove()
    L = seen_host[0][0]
    s, e = batch.audio_spans[0][-1]
    h = _capture(mac.lm.layers[1], seen_mac)
    mac.reset()
    with torch.no_grad(), mac.memory_active(mac.states) as ctx:
        mac._forward_turn(ctx, [emb])
    h.remove()
    L2, pos = seen_mac[0]
    assert L2 == L + n_p + T
    assert pos.shape[-1] == L2 and torch.equal(pos[0], torch.arange(L2))
    # the utterance's audio tokens now sit at positions s + N_p + T .. e + N_p + T
    assert torch.equal(ctx.layout.pos_idx, torch.arange(s + n_p + T, e + n_p + T))
    assert int(ctx.batch.answer_index[0]) == L2 - 1


def test_mac_at_a_later_block_and_its_state_carries(backbone, tiny_task):
    mac = make("mac", backbone, tiny_task.labels, layers="1")
    d = tiny_task.folds()[0].test[0].inputs()
    mac.reset()
    first = mac.step(d[1])
    mac.reset()
    mac.step(d[0])
    assert not np.allclose(first, mac.step(d[1]))  # the memory of utterance 0 changes utterance 1
    assert mac.num_trained_parameters() > 0


def _shortened(dialogues, seed=0):
    """The dialogues with every utterance cut to a random 30-100% of its length (unequal audio tokens)."""
    rng = np.random.default_rng(seed)
    return [[dataclasses.replace(u, waveform=u.waveform[:int(len(u.waveform) * rng.uniform(0.3, 1.0))],
                                 utterance_id=u.utterance_id + "-cut") for u in d.inputs()] for d in dialogues]


@pytest.mark.parametrize("name,layers", [("mac", "0"), ("mac", "all"), ("mag", "all"), ("mal", "all")])
def test_batched_dialogues_of_unequal_lengths_match_streaming(name, layers, backbone, tiny_task):
    """Every utterance of several dialogues in one right-padded LM forward (MAC: each item with its own
    N_p + T_b inserted tokens and attention mask) gives what streaming one utterance at a time gives."""
    m = make(name, backbone, tiny_task.labels, layers=layers, speaker_memory=True)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.branches.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    dialogues = _shortened(tiny_task.folds()[0].test)
    assert len({backbone.audio_embeddings(u).shape[0] for d in dialogues for u in d}) > 3
    batched = m.predict_dialogues(dialogues)
    for d, p in zip(dialogues, batched):
        m.reset()
        streamed = np.stack([m.step(u) for u in d])
        np.testing.assert_allclose(p, streamed, atol=PREFIX_ATOL)
        np.testing.assert_allclose(p[:2], m.predict_dialogue(d[:2]), atol=PREFIX_ATOL)
    # and the memory matters: the same utterances read from fresh memories differ
    alone = np.concatenate([m.predict_dialogue([u]) for u in dialogues[0]])
    assert np.abs(alone - batched[0]).max() > 1e-3


def test_mag_gates_in_place(backbone):
    D = backbone.hidden_size
    br = MAGBranch(D, MAGConfig(d_m=16), backbone.max_audio_tokens)
    h = torch.randn(2, 9, D)
    with torch.no_grad():
        out, state = br(h)
        assert out.shape == h.shape
        torch.testing.assert_close(out, h * torch.sigmoid(torch.tensor(3.0)))  # W_g = 0 at init
        br.W_g.weight.normal_(0, 0.5)
        out2, _ = br(h, state)
        m, _ = br.retrieve(h, state)
        torch.testing.assert_close(out2, h * torch.sigmoid(br.W_g(m)))       # Eq. 5
    assert br.gate_parameters() == [br.W_g.weight, br.W_g.bias]


def test_mag_keeps_length_and_positions(backbone, tiny_task):
    mag = make("mag", backbone, tiny_task.labels)
    emb = backbone.audio_embeddings(tiny_task.folds()[0].test[0].inputs()[0])
    seen = []
    h = _capture(mag.lm.layers[1], seen)
    with torch.no_grad(), mag.memory_active({}) as ctx:
        mag._forward_turn(ctx, [emb])
    h.remove()
    L, pos = seen[0]
    assert int(ctx.batch.answer_index[0]) == L - 1 and torch.equal(pos[0], torch.arange(L))


def test_the_three_share_one_branch(backbone):
    """Same memory parameters under one seed: the injection is the only difference."""
    D, T = backbone.hidden_size, backbone.max_audio_tokens
    shapes = {}
    for cls, cfg in ((MALBranch, MALConfig(d_m=16)), (MACBranch, MACConfig(d_m=16)), (MAGBranch, MAGConfig(d_m=16))):
        torch.manual_seed(0)
        br = cls(D, cfg, T)
        gates = {id(p) for p in br.gate_parameters()}
        shapes[cls.__name__] = {n: p.shape for n, p in br.named_parameters() if id(p) not in gates}
    assert shapes["MALBranch"] == shapes["MACBranch"] == shapes["MAGBranch"]


@pytest.mark.parametrize("name", ["mal", "mac", "mag"])
def test_placement_is_configurable(name, backbone, tiny_task):
    m = make(name, backbone, tiny_task.labels, layers="all")
    assert m.layer_ids == [0, 1] and set(m.branches) == {"0", "1"}
    p = m.predict_dialogue(tiny_task.folds()[0].test[0].inputs())
    assert np.all(np.isfinite(p))
    with pytest.raises(ValueError, match="out of range"):
        make(name, backbone, tiny_task.labels, layers="5")


def test_phase_two_trains_each_injection(backbone, tiny_task):
    fold = tiny_task.folds()[0]
    for name, cls in (("mac", MemoryAsContext), ("mag", MemoryAsGating)):
        m = make(name, backbone, tiny_task.labels)
        assert isinstance(m, cls)
        # gradients reach the branch through the carried state (MAG: its zero-initialised W_g first,
        # like MAL's alpha = 0; the rest of the branch once W_g has moved)
        d = fold.train[0]
        with m.memory_active({}) as ctx:
            loss = sum(torch.nn.functional.cross_entropy(
                m._forward_turn(ctx, [backbone.audio_embeddings(u.input)]), torch.tensor([u.label]))
                for u in d.utterances)
        loss.backward()
        no_grad = [n for n, p in m.branches.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        expect = ["0.P", "0.W_in.weight", "0.W_out.weight"] if name == "mac" else ["0.W_g.weight", "0.W_g.bias"]
        assert not set(expect) & set(no_grad), no_grad
        m.branches.zero_grad()
        report = m.fit(fold.train, fold.dev)
        assert len(report.curves[f"{name}_train_loss"]) > 0 and np.isfinite(report.curves[f"{name}_train_loss"]).all()
        assert all(not p.requires_grad for p in m.lora_params.values())
        assert any(n.startswith(f"{name}.0.memory.") for n in m.trained_parameters())
