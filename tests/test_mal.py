"""MAL (Titans-as-a-Layer Eq. 6-9): identity at init, exact state chaining, resets, placement."""

import numpy as np
import pytest
import torch
from titans_pytorch import NeuralMemory

from benchbench.backbone import Segment
from benchbench.methods.mal import MALBranch, MALConfig, MemoryAsALayer, resolve_layers


def make_mal(backbone, labels, **overrides):
    return MemoryAsALayer(backbone, labels, MemoryAsALayer.make_config("smoke", overrides), seed=0)


def test_untrained_mal_leaves_host_outputs_bit_identical(backbone, tiny_task):
    mal = make_mal(backbone, tiny_task.labels)
    d = tiny_task.folds()[0].test[0]
    with torch.no_grad():
        host = [mal.lm(mal.lm.batch([[Segment(backbone.audio_embeddings(u))]])) for u in d.inputs()]
    mal.reset()
    with_memory = []
    states = {}
    with torch.no_grad(), mal.memory_active(states) as ctx:
        for u in d.inputs():
            with_memory.append(mal._forward_turn(ctx, [backbone.audio_embeddings(u)]))
    assert len(states) == len(mal.layer_ids)  # the memories did run and carry state
    for a, b in zip(host, with_memory):
        assert torch.equal(a, b)


def test_branch_keeps_shape_and_positions(backbone):
    c = MALConfig(d_m=16)
    br = MALBranch(backbone.hidden_size, c, backbone.max_audio_tokens)
    h = torch.randn(2, 12, backbone.hidden_size)
    out, state = br(h)
    assert out.shape == h.shape and torch.equal(out, h)  # alpha = 0
    with torch.no_grad():
        br.alpha.fill_(0.5)
    out, _ = br(h, state)
    assert out.shape == h.shape and not torch.equal(out, h)


def test_chaining_utterances_equals_one_pass_over_the_dialogue(backbone):
    """S_i carried across calls computes what one pass over [z_1; z_2; z_3] computes (chunk_size 1)."""
    torch.manual_seed(0)
    c = MALConfig(d_m=16, n_persistent=4, chunk_size=1)
    br = MALBranch(backbone.hidden_size, c, backbone.max_audio_tokens)
    hs = [torch.randn(1, T, backbone.hidden_size) for T in (7, 11, 5)]
    zs = [torch.cat([br.P[None], br.W_in(h)], 1) for h in hs]
    with torch.no_grad():
        full, _ = br.memory(torch.cat(zs, 1))
        state, pieces = None, []
        for z in zs:
            r, state = br.memory(z, state=state)
            pieces.append(r)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-4)
    # and the carried state matters: utterance 3 read from a fresh memory differs
    with torch.no_grad():
        fresh, _ = br.memory(zs[2])
    assert (fresh - pieces[2]).abs().max() > 1e-3


def test_per_utterance_update_reads_exactly_the_previous_state(backbone):
    """chunk_size="utterance": every token of utterance i reads S_{i-1} (Eq. 1), whatever its length."""
    torch.manual_seed(0)
    D = backbone.hidden_size
    br = MALBranch(D, MALConfig(d_m=16, n_persistent=4), backbone.max_audio_tokens)
    with torch.no_grad():
        br.alpha.fill_(1.0)
    h1, h2 = torch.randn(1, 9, D), torch.randn(1, 13, D)
    with torch.no_grad():
        _, s1 = br(h1)
        out2, s2 = br(h2, s1)
        # token t's output depends on token t and on earlier utterances only, not on its neighbours
        h2b = h2.clone()
        h2b[:, 5:] += 1.0
        out2b, _ = br(h2b, s1)
        assert torch.equal(out2b[:, :5], out2[:, :5]) and not torch.allclose(out2b[:, 5:], out2[:, 5:])
        # ... and the last token too (titans-pytorch lets a chunk's last position read the new state)
        h2c = h2.clone()
        h2c[:, :-1] += 1.0
        assert torch.allclose(br(h2c, s1)[0][:, -1], out2[:, -1], atol=1e-6)
        # the previous utterance does matter, and a fresh memory reads something else
        assert (br(h2)[0] - out2).abs().max() > 1e-4
        h1b = h1 + 1.0
        assert (br(h2, br(h1b)[1])[0] - out2).abs().max() > 1e-4
    with pytest.raises(ValueError, match="longer than"):
        br(torch.randn(1, backbone.max_audio_tokens + 1, D))


def test_titans_pitfall_chunk_multiple_is_enforced(backbone):
    """titans-pytorch 0.5.5 mis-chains lengths that are not chunk multiples; MAL refuses them."""
    torch.manual_seed(0)
    mem = NeuralMemory(dim=16, chunk_size=8)
    a, b = torch.randn(1, 10, 16), torch.randn(1, 5, 16)
    with torch.no_grad():
        full, _ = mem(torch.cat([a, b], 1))
        _, s = mem(a)
        second, _ = mem(b, state=s)
    assert not torch.allclose(full[:, 10:], second, atol=1e-4)  # the upstream pitfall is real
    br = MALBranch(backbone.hidden_size, MALConfig(d_m=16, n_persistent=8, chunk_size=8), backbone.max_audio_tokens)
    with pytest.raises(ValueError, match="multiple of chunk_size"):
        br(torch.randn(1, 13, backbone.hidden_size))
    out, _ = br(torch.randn(1, 16, backbone.hidden_size))  # 8 + 16 = 24: fine
    assert out.shape == (1, 16, backbone.hidden_size)


def test_state_resets_at_dialogue_boundaries(backbone, tiny_task):
    mal = make_mal(backbone, tiny_task.labels)
    with torch.no_grad():
        for br in mal.branches.values():
            br.alpha.fill_(2.0)
            br.W_out.weight.normal_(0, 1.0)
    a, b = tiny_task.folds()[0].test[:2]
    alone = mal.predict_dialogue(a.inputs())
    mal.predict_dialogue(b.inputs())
    after_b = mal.predict_dialogue(a.inputs())
    assert np.array_equal(alone, after_b)
    # while inside a dialogue, the history changes the prediction of the same utterance
    mal.reset()
    first = mal.step(a.inputs()[-1])
    mal.reset()
    for u in a.inputs()[:-1]:
        mal.step(u)
    assert not np.allclose(first, mal.step(a.inputs()[-1]))


def test_phase_two_freezes_lora_and_trains_memory(backbone, tiny_task):
    mal = make_mal(backbone, tiny_task.labels)
    fold = tiny_task.folds()[0]
    report = mal.fit(fold.train, fold.dev)
    assert all(not p.requires_grad for p in mal.lora_params.values())
    assert all(p.requires_grad for p in mal.branches.parameters())
    assert len(report.curves["mal_train_loss"]) > 0 and np.isfinite(report.curves["mal_train_loss"]).all()
    assert report.selected["phase"] in (1, 2) and isinstance(report.phase1_replayed, bool)
    names = set(mal.trained_parameters())
    for l in mal.layer_ids:  # Eq. 10: {W_in, W_out, M, alpha, P} per branch
        for part in ("W_in.weight", "W_out.weight", "alpha", "P", "memory."):
            assert any(n.startswith(f"mal.{l}.{part}") for n in names), part


def test_sequential_surprise_takes_each_gradient_at_the_previous_memory():
    """Titans' rule (``surprise="sequential"``, the paper preset's): utterance t's surprise gradient is
    taken at M_{t-1}. Utterance 1 reads M_0 and utterance 2 reads M_0 plus a step whose gradient was
    taken at M_0 in either form, so both forms agree there; from utterance 3 on, the second step's
    gradient differs (at M_1, not M_0), and so do the outputs. The state's weights move after every
    call in the sequential form and stay M_0 in the initial one."""
    outs, weights = {}, {}
    for surprise in ("initial", "sequential"):
        torch.manual_seed(0)
        branch = MALBranch(64, MemoryAsALayer.make_config("smoke", {"surprise": surprise}), 100)
        with torch.no_grad():
            branch.alpha.fill_(1.0)  # open the gate so the read-out reaches the output
        init = {k: v.detach().clone() for k, v in branch.memory.memory_model.named_parameters()}
        gen = torch.Generator().manual_seed(1)
        state, outs[surprise] = None, []
        for _ in range(4):
            y, state = branch(torch.randn(1, 7, 64, generator=gen), state)
            outs[surprise].append(y)
        weights[surprise] = any(not torch.allclose(state.weights[k][0], init[k]) for k in init)
    for t in (0, 1):
        assert torch.equal(outs["initial"][t], outs["sequential"][t])
    for t in (2, 3):
        assert (outs["initial"][t] - outs["sequential"][t]).abs().max() > 1e-3
    assert weights == {"initial": False, "sequential": True}
    assert MemoryAsALayer.label(MemoryAsALayer.make_config("paper")) == "mal"
    assert MemoryAsALayer.label(MemoryAsALayer.make_config("default")) == "mal[speaker,m0-surprise]"
    with pytest.raises(ValueError, match="surprise"):
        MemoryAsALayer.make_config("smoke", {"surprise": "later"})


@pytest.mark.parametrize("name", ["mal", "mac", "mag"])
def test_phase1_none_trains_one_branch_on_the_frozen_host(name, backbone, tiny_task):
    """The injection ablation (Sec. 3.2): ``phase1=none`` trains the memory on the frozen host with no
    LoRA: the LoRA's B stays 0 (the host's outputs), only the branches train and count, the "Phase 1"
    dev selection can fall back to is the zero-shot host, and the label names the ablation."""
    from benchbench.method import METHODS

    cls = METHODS.get(name)
    m = cls(backbone, tiny_task.labels, cls.make_config("smoke", {"phase1": "none", "layers": "0"}), seed=0)
    fold = tiny_task.folds()[0]
    report = m.fit(fold.train, fold.dev)
    assert all(not p.requires_grad for p in m.lora_params.values())
    assert all(float(p.abs().max()) == 0 for n, p in m.lora_params.items() if "lora_B" in n)  # never trained
    assert set(m.trained_parameters()) and all(n.startswith(f"{name}.") for n in m.trained_parameters())
    assert report.phase1_replayed is None and f"{name}_phase1_dev_ua" in report.curves
    assert len(report.curves[f"{name}_train_loss"]) > 0
    assert cls.label(m.config, "smoke").endswith("{layers=0,phase1=none}" if name == "mal" else "{phase1=none}")
    with pytest.raises(ValueError, match="phase1"):
        cls.make_config("smoke", {"phase1": "some"})


@pytest.mark.parametrize("spec,n,expected", [
    ("all", 4, [0, 1, 2, 3]), ("quartile", 32, [7, 15, 23, 31]), ("quartile", 2, [0, 1]),
    ("quartile", 28, [6, 13, 20, 27]), ("0,2", 4, [0, 2])])
def test_layer_placement(spec, n, expected):
    assert resolve_layers(spec, n) == expected


def test_bad_layer_spec_raises():
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers("0,9", 4)
    with pytest.raises(ValueError, match="expected"):
        resolve_layers("every-other", 4)


def test_headroom_probe_features(backbone, tiny_task):
    """The probe's context features are what they claim, and every probe returns accuracies."""
    from benchbench.tools.headroom import FEATURES, _tensors, probe

    d = tiny_task.folds()[0].train[:3]
    E, Y, K, spk, dlg = _tensors(backbone, d)
    pooled = E.mean(2)
    for n, dia in enumerate(d):
        speakers = [u.input.speaker for u in dia.utterances]
        for i, s in enumerate(speakers):
            same = [j for j in range(i) if speakers[j] == s]
            assert K[n, i] == len(same)
            want = pooled[n, same].mean(0) if same else torch.zeros_like(pooled[n, i])
            torch.testing.assert_close(spk[n, i], want)
            torch.testing.assert_close(dlg[n, i], pooled[n, :i].mean(0) if i else torch.zeros_like(want))
    res = probe(preset="smoke", epochs=1)
    assert set(res) == set(FEATURES)
    assert all(0.0 <= r["wa"] <= 1.0 and r["by_speaker_history"] for r in res.values())


def test_speaker_memory_keeps_one_state_per_speaker(backbone, tiny_task):
    """speaker_memory: an utterance reads only its own speaker's earlier utterances."""
    mal = make_mal(backbone, tiny_task.labels, speaker_memory=True)
    with torch.no_grad():
        for br in mal.branches.values():
            br.alpha.fill_(2.0)
            br.W_out.weight.normal_(0, 1.0)
    d = next(d for d in tiny_task.folds()[0].test if len({u.speaker for u in d.inputs()[:3]}) == 2)
    u = d.inputs()
    same = [x for x in u[:-1] if x.speaker == u[-1].speaker]
    other = [x for x in u[:-1] if x.speaker != u[-1].speaker]
    assert same and other
    full = mal.predict_dialogue(u)[-1]
    mal.reset()
    for x in same:
        mal.step(x)
    assert np.allclose(full, mal.step(u[-1]), atol=1e-6)  # the other speaker's turns do not matter
    mal.reset()
    for x in other:
        mal.step(x)
    assert not np.allclose(full, mal.step(u[-1]), atol=1e-4)
    assert set(mal.states) == {x.speaker for x in other} | {u[-1].speaker}  # one state per speaker
    fold = tiny_task.folds()[0]
    # Phase 2 trains each speaker's utterances as one sequence (independent memory streams)
    seen, forward = [], mal._forward

    def recording(ctx, embeddings, streams):
        if mal.branches.training:
            seen.append([len(st) for st in streams])
            assert sorted(i for st in streams for i in st) == list(range(len(embeddings)))
            assert all(st == sorted(st) for st in streams)  # turn order inside a stream
        return forward(ctx, embeddings, streams)

    mal._forward = recording
    report = mal.fit(fold.train, fold.dev)
    assert np.isfinite(report.curves["mal_train_loss"]).all()
    streams = sorted(n for d in fold.train for n in np.unique([u.speaker for u in d.inputs()], return_counts=True)[1])
    assert sorted(n for batch in seen for n in batch) == sorted(streams * mal.config.epochs)


DETERMINISM_SCRIPT = """
import hashlib, sys, numpy as np, torch
torch.set_num_threads(int(sys.argv[1]))
from benchbench.backbones.qwen2_audio import tiny_qwen2_audio
from benchbench.cells import Cell, compute_cell
from benchbench.tasks.synthetic import SyntheticProsodyTask
bb = tiny_qwen2_audio(seed=0)
task = SyntheticProsodyTask(preset="smoke", n_train=24, n_dev=4, n_test=3, n_turns=10, duration_s=1.2)
f, manifest = task.folds()[0], task.manifest()
print("process threads", torch.get_num_threads())
for name in ("mal", "mag", "dpm"):
    cell = Cell(name, task, f, 0, bb, "tiny-qwen2-audio", "default", "default", {"lora": {"epochs": 1}}, manifest,
                threads=1)
    record = compute_cell(cell)
    assert record.ok, record.row
    assert torch.get_num_threads() == int(sys.argv[1])  # the cell's count is the cell's only
    p = record.predictions[[c for c in record.predictions if c.startswith("p_")]].to_numpy()
    print(name, record.row["torch_threads"], hashlib.sha256(p.tobytes()).hexdigest())
"""


def test_cells_are_bit_identical_whatever_their_processs_thread_count():
    """Two fresh processes, one on 1 torch thread (a Ray worker's) and one on 2 (a local run here),
    compute mal (memory streams of unequal lengths), mag and dpm (dialogues side by side) cells to the
    same bits. A cell trains and predicts on its own fixed thread count (``Cell.threads``, ``bench run
    --threads``), because on an Intel Xeon with AVX512 under MKL these paths give other bits on 1 and
    on 2 threads (on the AMD EPYC of an earlier release they did not); inside, the gathers whose
    backward sums duplicate reads are index_select (advanced indexing's accumulation order varied
    across runs on CPU) and MAL's scalar gate is summed per token first."""
    import subprocess
    import sys

    # both processes at once (the bits of a cell must not depend on what else the machine runs either)
    procs = [subprocess.Popen([sys.executable, "-c", DETERMINISM_SCRIPT, str(threads)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for threads in (1, 2)]
    done = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in done]
    outs = [out.splitlines() for out, _ in done]
    assert [outs[0][0], outs[1][0]] == ["process threads 1", "process threads 2"]  # what is compared differs
    assert outs[0][1:] == outs[1][1:] and len(outs[0]) == 4
    assert all(line.split()[1] == "1" for line in outs[0][1:])  # recorded: torch_threads = 1


def test_more_than_one_memory_head_is_refused_with_the_upstream_reason():
    """titans-pytorch issue #64: with heads > 1 the per-head parameters share storage and training fails
    (a RuntimeError at the first step, seen on both surprise forms); no preset or search space reaches
    it, and asking for it is a clear error instead of a crash mid-cell."""
    for preset in ("smoke", "default", "paper"):
        assert MemoryAsALayer.make_config(preset).memory_heads == 1
    with pytest.raises(ValueError, match="issue #64"):
        MemoryAsALayer.make_config("smoke", {"memory_heads": 2})
