"""ttt, rmt and retrieval (issue 35): each memory's update and read-out against a computation by hand,
and the properties the shared schedule relies on (the gradient through the memory, the labels)."""

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from benchbench.method import METHODS
from benchbench.methods.retrieval import RetrievalBranch, RetrievalConfig
from benchbench.methods.titans_memory import StreamLayout
from benchbench.methods.ttt import TTTBranch, TTTConfig


def _stream(lengths, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(t, D, generator=g) for t in lengths]
    spans, pos = [], 0
    for t in lengths:
        spans.append((pos, pos + t))
        pos += t
    return xs, StreamLayout.build(spans, [list(range(len(lengths)))], 0, "utterance", max(lengths))


@pytest.mark.parametrize("model", ["linear", "mlp"])
def test_ttt_update_is_one_gradient_step_at_the_previous_weights(model):
    """Utterance 2 reads W_1 = W_0 - sum_t eta_t grad l(W_0; z_t) over utterance 1's tokens, with
    eta_t = eta_base * sigmoid(theta_lr z_t) / T_1 (TTT Eq. 4-7): no momentum, no decay, no clipping;
    utterance 3 reads W_2 = W_1 - (its step at W_1)."""
    torch.manual_seed(0)
    D = 12
    c = TTTConfig(d_m=6, model=model)
    branch = TTTBranch(D, c, max_tokens=8)
    with torch.no_grad():  # make every outer parameter matter
        for p in branch.memory.parameters():
            p.add_(0.3 * torch.randn_like(p))
    xs, layout = _stream([5, 3, 4], D)
    m, _ = branch.read(torch.cat(xs), layout)
    mem = branch.memory
    names = list(dict(mem.memory_model.named_parameters()))
    W = {n: p.detach()[0] if p.dim() and p.shape[0] == 1 else p.detach()
         for n, p in zip(names, mem.memory_model_parameters)}

    def step(W, x):  # TTT's mini-batch gradient step on one utterance, by hand
        s = mem.store_norm(branch.W_in(x)[None])[0]
        k, v = mem.to_keys(s), mem.to_values(s)
        eta = torch.sigmoid(mem.to_adaptive_step[0](s)[:, 0]) * c.eta / x.shape[0]
        W = {n: w.clone().requires_grad_(True) for n, w in W.items()}
        pred = functional_call(mem.memory_model, W, k)
        loss = (eta * (pred - v).pow(2).mean(-1)).sum()
        grads = torch.autograd.grad(loss, list(W.values()))
        return {n: (w - g).detach() for (n, w), g in zip(W.items(), grads)}

    def read(W, x):
        mem.retrieve_chunk_size = 1
        batched = {n: w[None] if w.dim() == p.dim() - 1 else w for (n, w), p in zip(W.items(), mem.memory_model_parameters)}
        return branch.W_out(mem.retrieve_memories(branch.W_in(x)[None], batched)[0])

    W1 = step(W, xs[0])
    W2 = step(W1, xs[1])
    with torch.no_grad():
        torch.testing.assert_close(m[5:8], read(W1, xs[1]), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(m[8:12], read(W2, xs[2]), atol=1e-5, rtol=1e-4)
        assert not torch.allclose(read(W1, xs[1]), read(W, xs[1]), atol=1e-3)  # the step moved the read-out


def _assert_streams_as_it_batches(branch, lengths, D, **tol):
    """One call over the whole stream equals reading it utterance by utterance, state carried."""
    xs, layout = _stream(lengths, D)
    batched, _ = branch.read(torch.cat(xs), layout)
    state, streamed = None, []
    for x in xs:
        out, state = branch.read(x, StreamLayout.build([(0, len(x))], [[0]], 0, "utterance", max(lengths)), state)
        streamed.append(out)
    torch.testing.assert_close(batched, torch.cat(streamed), **tol)


def test_ttt_streams_as_it_batches():
    torch.manual_seed(1)
    _assert_streams_as_it_batches(TTTBranch(10, TTTConfig(d_m=4), max_tokens=6), [4, 6, 2], 10, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("top_k", [0, 1])
def test_retrieval_attends_over_the_pooled_earlier_turns(top_k):
    """Utterance i's tokens attend over mean-pooled states of turns < i (the top_k best with top_k);
    the first turn reads zero; by hand."""
    torch.manual_seed(0)
    D = 8
    branch = RetrievalBranch(D, RetrievalConfig(d_m=4, top_k=top_k), max_tokens=6)
    xs, layout = _stream([3, 5, 2], D)
    m, (entries, valid) = branch.read(torch.cat(xs), layout)
    e = torch.stack([x.mean(0) for x in xs])
    torch.testing.assert_close(entries[0], e)
    assert bool(valid.all()) and valid.shape == (1, 3)
    assert torch.equal(m[:3], torch.zeros(3, D))
    with torch.no_grad():
        for i, (lo, hi) in ((1, (3, 8)), (2, (8, 10))):
            s = branch.W_q(xs[i]) @ branch.W_k(e[:i]).T / math.sqrt(4)
            if top_k:
                s = s.masked_fill(s < s.topk(min(top_k, i), dim=1).values[:, -1:], -math.inf)
            want = branch.W_out(torch.softmax(s, 1) @ branch.W_v(e[:i]))
            torch.testing.assert_close(m[lo:hi], want, atol=1e-6, rtol=1e-5)


def test_retrieval_streams_as_it_batches():
    torch.manual_seed(2)
    _assert_streams_as_it_batches(RetrievalBranch(8, RetrievalConfig(d_m=4, top_k=2), max_tokens=6), [3, 5, 2, 4], 8,
                                  atol=1e-6, rtol=1e-5)


def test_rmt_writes_the_hosts_states_and_reads_them_next_turn(backbone, tiny_task):
    """Turn i's memory is the LM's final states at turn i-1's write positions, and the gradient of a
    later turn's loss reaches H^mem_0 through the memory (none with bptt=1: the memory is cut)."""
    cls = METHODS.get("rmt")
    d = tiny_task.folds()[0].train[0].inputs()[:3]
    for bptt, reaches in ((0, True), (1, False)):
        m = cls(backbone, tiny_task.labels, cls.make_config("smoke", {"bptt": bptt}), seed=0)
        init = m.branches["memory"].initial
        logits = m._forward_dialogues([d])
        (g,) = torch.autograd.grad(logits[2].sum(), init, allow_unused=True)
        assert (g is not None and bool(g.abs().sum() > 0)) == reaches
    m.reset()
    with torch.no_grad():
        _, first = m._forward_memory([m.audio_embeddings(d[0])], [init])
        p = m.step(d[0])
        torch.testing.assert_close(m.states[0], first[0])
        logits, _ = m._forward_memory([m.audio_embeddings(d[1])], [first[0]])
        np.testing.assert_allclose(m.step(d[1]), torch.softmax(logits, -1)[0].numpy(), atol=1e-6)
    assert p.shape == (len(tiny_task.labels),)


@pytest.mark.parametrize("name,overrides,label", [
    ("ttt", None, "ttt[speaker]"), ("ttt", {"model": "mlp"}, "ttt[speaker,mlp]"),
    ("rmt", None, "rmt[speaker]"), ("retrieval", None, "retrieval[speaker]"),
    ("retrieval", {"top_k": 2}, "retrieval[speaker]{top_k=2}")])
def test_default_preset_labels(name, overrides, label):
    cls = METHODS.get(name)
    assert cls.label(cls.make_config("default", overrides), "default") == label
    assert cls.label(cls.make_config("paper"), "paper") == name


def test_ttt_counts_its_test_time_updates(backbone, tiny_task):
    from benchbench.testing import fitted

    m = fitted("ttt", backbone, tiny_task)
    m.activate_context()
    m.test_time_cost.clear()
    d = tiny_task.folds()[0].test[0].inputs()
    m.predict_dialogues([d])
    assert m.test_time_cost["test_time_updates"] == len(d) * len(m.branches)


@pytest.mark.parametrize("name", ["ttt", "rmt", "retrieval"])
@pytest.mark.parametrize("preset", ["default", "paper"])
def test_builds_and_streams_at_every_preset(name, preset, backbone, tiny_task):
    """The presets the kit does not run (it runs smoke): built, memory on, a dialogue streamed and
    batched alike, one state per dialogue in the paper preset and per speaker in the default one."""
    cls = METHODS.get(name)
    config = cls.make_config(preset)
    assert config.speaker_memory == (preset == "default")
    m = cls(backbone, tiny_task.labels, config, seed=0)
    m.activate_context()
    d = tiny_task.folds()[0].test[0].inputs()
    batched = m.predict_dialogues([d])[0]
    m.reset()
    streamed = np.stack([m.step(u) for u in d])
    np.testing.assert_allclose(batched, streamed, atol=1e-5)
    assert batched.shape == (len(d), len(tiny_task.labels)) and np.isfinite(batched).all()
