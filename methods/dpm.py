"""``dpm``: Dynamic Parameter Memory (Mai et al., the DPM paper, Sec. 3 and Algorithm 1).

A temporary LoRA, trained at test time utterance by utterance on the dialogue's audio, is the memory.

**Audio tokens (the suite's reading).** The paper's emotion SLLM consumes and predicts discrete audio
tokens (CosyVoice2, 25 Hz). Our backbones take continuous audio-token embeddings, so here the audio
"tokens" are discrete *units*: a k-means codebook (``n_units`` centroids, scikit-learn
``MiniBatchKMeans``) fitted on the frozen audio-token embeddings ``[T, D]`` of the training split
(like HuBERT units); each audio token's unit is its nearest centroid. The LM still reads the
continuous embeddings; it gets a small output head ``[D] -> [n_units + 1]`` over the units plus the
end-of-utterance unit <audio_end> (the paper's vocabulary extension, Eq. 1-2). A dialogue's token
stream is its utterances' audio tokens, each utterance followed by the ``<|audio_eos|>`` embedding,
whose target unit is <audio_end>.

**Phase 1 (Sec. 3.1): the emotion SLLM.** The task LoRA and the unit head are trained with
``L = 1/2 (L_a + L_e)`` (Eq. 7):

* ``L_a`` (Eq. 3-4): next-unit cross-entropy over the utterance's last ``n_o`` stream positions (its
  final tokens and <audio_end>), teacher-forced from the ``n_p`` tokens before them, which may reach
  back into the dialogue's earlier utterances; both shrink at the stream's start (Eq. 4).
* ``L_e`` (Eq. 5-7): cross-entropy over the constrained label logits (the backbone's label
  verbalizer tokens) for the current utterance in the suite's prompt. Our reading of the prefix n_q
  (Eq. 6): the current utterance only, so the temporary LoRA is the only way the history reaches a
  prediction.

**Inference (Sec. 3.2, Algorithm 1).** Per dialogue a fresh temporary LoRA (r=64, alpha=64, all
linear layers of the LM, AdamW lr 5e-5, betas (0.9, 0.999), eps 1e-7 after Temp-LoRA) sits on top
of the frozen task LoRA (peft, two active adapters; their outputs add). For utterance i:

1. y_i is predicted with the temporary LoRA as it stands (after utterances < i);
2. the temporary LoRA takes ``test_time_steps`` AdamW step(s) on ``L_t`` (Eq. 8-9): next-unit
   cross-entropy of utterance i's units and <audio_end> given the ``n_r`` stream tokens before it
   (teacher forced inside the utterance; Eq. 11 at the stream's start). Audio only, never a label.

At the dialogue's end it is discarded: :meth:`reset` restores its initial values (A drawn once per
method from its seed, B = 0, so a fresh temporary LoRA leaves the task LoRA's outputs bit-identical)
and a new optimizer. Algorithm 1 skips the update for a sample's first sentence (it has no prefix);
here the first utterance is also written to memory, with only the within-utterance prefix, because a
speaker's first utterance is part of the dialogue's evidence. ``n_o``, ``n_p`` and ``n_r`` are not
given in the paper: the defaults are ours (2 s and 4 s of 25 Hz tokens; the CPU-sized ``default``
preset reads n_r = 25 tokens, 1 s, before the utterance: an update costs about 2 x (n_r + T + 1)
token-forwards against the prediction's prompt + T, so n_r sets DPM's cost; ``bench speed``).

**Cost.** Every test utterance costs one LM forward holding both the prediction and the first
update's window (both read the parameters after utterance i-1), its backward, and one forward and
backward per further update; ``test_time_cost`` reports the updates and their milliseconds per
utterance (the fused prediction included), and the harness logs them beside the other costs. A non-finite test-time loss (or
gradient) skips that update, is recorded in ``test_time_issues`` with its dialogue and utterance, and
the run goes on.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from peft import LoraConfig
from torch import nn

from benchbench.backbone import AUDIO_BOS, AUDIO_EOS, Segment
from benchbench.data import Dialogue, UtteranceInput
from benchbench.method import ContextMethod, MethodConfig, ProgressFn, check_ranges
from benchbench.training import (LM_LINEAR_LAYERS, BestCheckpoint, LoRASettings, attach_lora, auxiliary_rng,
                                 dev_epoch_score, lora_search_space)

log = logging.getLogger(__name__)


def _paper_task_lora() -> LoRASettings:
    # DPM Sec. 4.2: the emotion SLLM's LoRA r=64, alpha=64 on all linear layers, lr 5e-5, 20 epochs, batch 1
    return LoRASettings(r=64, alpha=64, lr=5e-5, epochs=20, batch_size=1)


@dataclass
class DPMConfig(MethodConfig):
    lora: LoRASettings = field(default_factory=_paper_task_lora)  # Phase 1: the emotion SLLM's task LoRA
    n_units: int = 500             # k-means codebook size (the paper: CosyVoice2's codebook; ours: HuBERT-like)
    kmeans_max_frames: int = 200_000  # audio tokens sampled from the training split for the codebook
    n_o: int = 50                  # L_a targets: the utterance's last n_o tokens incl. <audio_end> (Eq. 3)
    n_p: int = 100                 # ... teacher-forced from the n_p tokens before them (Eq. 3-4)
    n_r: int = 100                 # L_t: tokens before the utterance as its prefix (Eq. 8-9, 11)
    temp_r: int = 64               # temporary LoRA rank (Sec. 4.2)
    temp_alpha: int = 64
    temp_dropout: float = 0.05     # inactive at test time (eval mode)
    temp_target_modules: tuple[str, ...] = LM_LINEAR_LAYERS  # all linear layers of the LM blocks
    temp_lr: float = 5e-5          # temporary LoRA learning rate (Sec. 4.2)
    temp_eps: float = 1e-7         # AdamW eps (Temp-LoRA)
    test_time_steps: int = 1       # updates per utterance (the paper: one)
    unit_head_lr: float | None = None  # None: the task LoRA's lr

    def check(self) -> None:
        check_ranges(self, at_least=dict(n_units=1, kmeans_max_frames=1, n_o=1, n_p=0, n_r=1, temp_r=1,
                                         test_time_steps=1),
                     positive=("temp_alpha", "temp_lr", "temp_eps", "unit_head_lr"), fraction=("temp_dropout",))


class _UnitStream:
    """The dialogue's token stream as seen so far: embeddings ``[n, D]`` and units ``[n]`` (kept to a window)."""

    def __init__(self, keep: int):
        self.keep = keep
        self.emb: torch.Tensor | None = None
        self.units: torch.Tensor | None = None

    def append(self, emb: torch.Tensor, units: torch.Tensor) -> int:
        """Add one utterance (with its end token); returns its start index in the kept window."""
        if self.emb is None:
            self.emb, self.units = emb, units
            return 0
        start = self.emb.shape[0]
        self.emb, self.units = torch.cat([self.emb, emb]), torch.cat([self.units, units])
        drop = max(0, start - self.keep)  # only n_r tokens before the newest utterance are ever read
        if drop:
            self.emb, self.units, start = self.emb[drop:], self.units[drop:], start - drop
        return start


class DynamicParameterMemory(ContextMethod):
    """Task LoRA + unit head (Phase 1), then a per-dialogue temporary LoRA trained at test time."""

    name = "dpm"
    config_cls = DPMConfig
    uses_context = True
    presets = {
        "smoke": dict(lora=dict(r=8, alpha=16, lr=2e-3, epochs=1, batch_size=16), n_units=16,
                      n_o=8, n_p=8, n_r=16, temp_r=8, temp_alpha=8, temp_lr=1e-3),
        # CPU-sized: steps scaled to the tiny random-init backbone, like the other methods
        "default": dict(lora=dict(r=32, alpha=64, lr=1e-3, epochs=6, batch_size=32), n_units=64,
                        n_o=25, n_p=50, n_r=25, temp_r=16, temp_alpha=16, temp_lr=3e-3),
    }

    @classmethod
    def search_space(cls, trial):
        """Phase 1's LoRA and codebook size, then the test-time memory: temporary-LoRA rank, learning
        rate, steps per utterance and prefix length n_r."""
        return {"lora": lora_search_space(trial),
                "n_units": trial.suggest_categorical("n_units", [16, 32, 64, 128]),
                "temp_r": trial.suggest_categorical("temp_r", [8, 16, 32, 64]),
                "temp_lr": trial.suggest_float("temp_lr", 1e-5, 1e-2, log=True),
                "test_time_steps": trial.suggest_int("test_time_steps", 1, 3),
                "n_r": trial.suggest_categorical("n_r", [25, 50, 100, 200])}

    def __init__(self, backbone, labels, config=None, seed=0):
        super().__init__(backbone, labels, config, seed)
        c = self.config
        self.task_params = attach_lora(self.lm, c.lora, adapter_name="task")
        peft_model = self.lm.language_model
        with auxiliary_rng(seed):  # own RNG stream: Phase 1 does not depend on it
            peft_model.add_adapter("temp", LoraConfig(r=c.temp_r, lora_alpha=c.temp_alpha,
                                                      lora_dropout=c.temp_dropout,
                                                      target_modules=list(c.temp_target_modules)))
            self.unit_head = nn.Linear(self.lm.hidden_size, c.n_units + 1).to(self.lm.lm_head.weight)  # + <audio_end>
        peft_model.base_model.set_adapter(["task", "temp"])  # outputs of active adapters add up
        self.temp_params = {n: p for n, p in self.lm.named_parameters() if "lora_" in n and ".temp." in n}
        if not self.temp_params:
            raise ValueError(f"dpm: temporary LoRA target modules {c.temp_target_modules} matched no layer")
        self._frozen = False  # True once Phase 1 is done (Algorithm 1, line 1)
        self._memory_on = True  # False inside task_lora_only()
        self._set_requires_grad()
        self.temp_init = {n: p.detach().clone() for n, p in self.temp_params.items()}
        if any(bool(self.temp_init[n].abs().sum()) for n in self.temp_init if "lora_B" in n):
            raise RuntimeError("dpm: a fresh temporary LoRA must start with B = 0")
        self.codebook: torch.Tensor | None = None  # [n_units, D], fitted in Phase 1
        self.reset()

    # ------------------------------------------------------------------ units
    def fit_codebook(self, train: Sequence[Dialogue]) -> None:
        """k-means over the training split's audio-token embeddings (seeded; ``ValueError`` if the split
        has fewer audio tokens than ``n_units``)."""
        from sklearn.cluster import MiniBatchKMeans

        frames = torch.cat([self.backbone.audio_embeddings(u.input) for d in train for u in d.utterances])
        X = frames.float().numpy()
        if len(X) < self.config.n_units:
            raise ValueError(f"dpm: the training split has {len(X)} audio tokens, fewer than n_units="
                             f"{self.config.n_units}")
        if len(X) > self.config.kmeans_max_frames:
            X = X[self.rng.choice(len(X), self.config.kmeans_max_frames, replace=False)]
        km = MiniBatchKMeans(n_clusters=self.config.n_units, random_state=self.seed, n_init=3,
                             batch_size=4096).fit(X)
        self.codebook = torch.tensor(km.cluster_centers_, dtype=frames.dtype)

    def units(self, emb: torch.Tensor) -> torch.Tensor:
        """Unit ids ``[T]`` (nearest centroid) of audio-token embeddings ``[T, D]``."""
        if self.codebook is None:
            raise RuntimeError("dpm: not fitted (no unit codebook)")
        return torch.cdist(emb.float()[None], self.codebook.float()[None])[0].argmin(-1)

    def _utterance_tokens(self, utt: UtteranceInput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(audio embeddings ``[T, D]``, stream embeddings ``[T + 1, D]`` with <|audio_eos|>, units ``[T + 1]``)."""
        emb = self.backbone.audio_embeddings(utt)
        eos = self.lm.text_embeddings(self.backbone.prompt.audio_eos or self.lm.tokenizer.eos_token or AUDIO_EOS)
        eos = eos[-1:].to(device=emb.device, dtype=emb.dtype)  # one <audio_end> position
        units = torch.cat([self.units(emb), torch.tensor([self.config.n_units])])  # <audio_end> = unit K
        return emb, torch.cat([emb, eos]), units

    # ------------------------------------------------------------------ the autoregressive unit loss
    def _unit_windows(self, windows: Sequence[tuple[torch.Tensor, torch.Tensor, int]],
                      prompts: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean next-unit cross-entropy over a batch of windows, and the label logits of ``prompts``
        from the same LM forward.

        Each window is ``(emb [n, D], units [n], n_scored)``: the LM reads ``[<|audio_bos|>; emb[:-1]]``
        and position j predicts ``units[j]``; the last ``n_scored`` predictions are scored (Eq. 3 / 9).
        Each prompt is one utterance's audio embeddings ``[T, D]`` in the suite's prompt (as ``lora``
        reads it). All are right-padded into one batch. Returns the mean over windows of each window's
        mean (0 without windows) and the label logits ``[P, C]`` (``None`` without prompts).
        """
        w = self.lm.lm_head.weight
        bos = self.lm.text_embeddings(self.backbone.prompt.audio_bos or self.lm.tokenizer.bos_token or AUDIO_BOS)[:1]
        seqs = [self.lm.build_sequence([Segment(e)])[0] for e in prompts]
        seqs += [torch.cat([bos.to(e), e[:-1]]).to(w) for e, _, _ in windows]
        L, D = max(s.shape[0] for s in seqs), seqs[0].shape[1]
        x = seqs[0].new_zeros(len(seqs), L, D)
        mask = torch.zeros(len(seqs), L, dtype=torch.long, device=x.device)
        for b, s in enumerate(seqs):
            x[b, : s.shape[0]], mask[b, : s.shape[0]] = s, 1
        h = self.lm.hidden_states(x, mask)                                     # [B, L, D]
        P = len(prompts)
        logits = None
        if P:
            answer = torch.tensor([s.shape[0] - 1 for s in seqs[:P]], device=h.device)
            logits = nn.functional.linear(h[torch.arange(P, device=h.device), answer],
                                          w[self.lm.verbalizer_ids])           # [P, C], as EmotionLM.forward
        losses = []
        for b, (e, u, k) in enumerate(windows):
            n = e.shape[0]
            out = self.unit_head(h[P + b, n - k:n])                            # [k, n_units + 1]
            losses.append(nn.functional.cross_entropy(out.float(), u[n - k:].to(out.device)))
        return (torch.stack(losses).mean() if losses else h.new_zeros(())), logits

    def _phase1_window(self, emb: torch.Tensor, units: torch.Tensor, end: int):
        """Eq. 3-4: the last n_o tokens up to ``end`` (exclusive) and the n_p before them."""
        n_o = min(self.config.n_o, end)
        start = max(0, end - n_o - self.config.n_p)
        return emb[start:end], units[start:end], n_o

    # ------------------------------------------------------------------ Phase 1 (Sec. 3.1)
    def fit(self, train, dev, progress: ProgressFn | None = None):
        c, s = self.config, self.config.lora
        self.fit_codebook(train)
        examples = []  # (current utterance's audio [T, D], label, L_a window)
        for d in train:
            toks = [self._utterance_tokens(u.input) for u in d.utterances]
            stream_emb, stream_units = torch.cat([t[1] for t in toks]), torch.cat([t[2] for t in toks])
            end = 0
            for (emb, _, units), u in zip(toks, d.utterances):
                end += units.shape[0]
                if not u.scored:  # context-only: in the stream, never an L_e target
                    continue
                examples.append((emb, u.label, self._phase1_window(stream_emb, stream_units, end)))
        trained = self.trained_parameters()
        opt = torch.optim.AdamW([{"params": list(self.task_params.values())},
                                 {"params": list(self.unit_head.parameters()),
                                  "lr": c.unit_head_lr if c.unit_head_lr is not None else s.lr}],
                                lr=s.lr, weight_decay=s.weight_decay)
        curves = {k: self.curves.setdefault(f"dpm_{k}", []) for k in ("train_loss", "train_loss_a", "train_loss_e",
                                                                      f"dev_{s.selection_metric}")}
        best = BestCheckpoint.of_parameters(trained)
        for epoch in range(s.epochs):
            self.lm.train()
            self.unit_head.train()
            perm = self.rng.permutation(len(examples))
            for i in range(0, len(perm), s.batch_size):
                chunk = [examples[j] for j in perm[i:i + s.batch_size]]
                # L_e's prompts and L_a's windows in one LM forward
                loss_a, logits = self._unit_windows([w for _, _, w in chunk], prompts=[e for e, _, _ in chunk])  # Eq. 3
                loss_e = nn.functional.cross_entropy(logits, torch.tensor([y for _, y, _ in chunk],
                                                                          device=logits.device))  # Eq. 5
                loss = 0.5 * (loss_a + loss_e)                                                       # Eq. 7
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"dpm phase 1: non-finite training loss at epoch {epoch}")
                grads = torch.autograd.grad(loss, list(trained.values()))  # the temporary LoRA is not trained here
                for p, g in zip(trained.values(), grads):
                    p.grad = g
                opt.step()
                opt.zero_grad()
                for k, v in (("train_loss", loss), ("train_loss_a", loss_a), ("train_loss_e", loss_e)):
                    curves[k].append(v.item())
            self.lm.eval()
            self.unit_head.eval()
            score = dev_epoch_score(self, dev, s.selection_metric, curves[f"dev_{s.selection_metric}"],
                                    f"dpm epoch {epoch + 1}/{s.epochs}", progress)  # DPM inference on dev
            best.offer(score, epoch)
        best.restore()
        self._frozen = True  # Algorithm 1, line 1: freeze the SLLM and its LoRA
        self._set_requires_grad()
        self.lm.eval()
        self.reset()

    # ------------------------------------------------------------------ inference (Sec. 3.2, Algorithm 1)
    def reset(self) -> None:
        """A fresh temporary LoRA (its initial values, B = 0) with a fresh optimizer; a new stream."""
        with torch.no_grad():
            for n, p in self.temp_params.items():
                p.copy_(self.temp_init[n])
        self._opt = torch.optim.AdamW(list(self.temp_params.values()), lr=self.config.temp_lr,
                                      betas=(0.9, 0.999), eps=self.config.temp_eps, weight_decay=0.0)
        self._stream = _UnitStream(keep=self.config.n_r)

    @contextmanager
    def task_lora_only(self):
        """Predict with the task LoRA alone: the temporary adapter switched off and no test-time
        updates (the "SLLM without DPM" ablation of the paper's Table 1)."""
        base = self.lm.language_model.base_model
        base.set_adapter(["task"])
        self._memory_on = False
        try:
            yield
        finally:
            base.set_adapter(["task", "temp"])
            self._memory_on = True
            self._set_requires_grad()

    def _set_requires_grad(self) -> None:
        """Temporary LoRA trainable; task LoRA and unit head trainable only until Phase 1 ends (peft's
        set_adapter unfreezes every adapter it activates, so this runs after each adapter change)."""
        for p in list(self.task_params.values()) + list(self.unit_head.parameters()):
            p.requires_grad_(not self._frozen)
        for p in self.temp_params.values():
            p.requires_grad_(True)

    def step(self, utterance: UtteranceInput) -> np.ndarray:
        """Algorithm 1 for one utterance: y_i from the temporary LoRA as it stands, then its update on
        utterance i's units. The prediction and the first update's loss come from one LM forward (both
        read the same parameters, those after utterance i-1)."""
        self.lm.eval()
        emb, stream_emb, units = self._utterance_tokens(utterance)
        if not self._memory_on:
            with torch.no_grad():
                return torch.softmax(self.lm(self.lm.batch([[Segment(emb)]])).float(), -1).numpy()[0]
        # 2. write utterance i into the temporary LoRA: L_t over its units given n_r tokens before (Eq. 8-9)
        t0 = time.perf_counter()
        self._stream.append(stream_emb, units)  # keeps at most n_r tokens before this utterance
        window = (self._stream.emb, self._stream.units, units.shape[0])
        params = list(self.temp_params.values())
        done, probs = 0, None
        for k in range(self.config.test_time_steps):
            loss, logits = self._unit_windows([window], prompts=[emb] if k == 0 else ())
            if k == 0:  # 1. y_i with the temporary LoRA as it stands (after utterances < i)
                probs = torch.softmax(logits.detach().float(), -1).numpy()[0]
            grads = torch.autograd.grad(loss, params)  # the temporary LoRA only: the task LoRA never moves
            finite = torch.isfinite(loss) and all(bool(torch.isfinite(g).all()) for g in grads)
            if not finite:
                issue = {"dialogue_id": utterance.dialogue_id, "utterance_id": utterance.utterance_id,
                         "turn": utterance.turn, "loss": float(loss.detach()),
                         "problem": "non-finite test-time loss or gradient; update skipped"}
                self.test_time_issues.append(issue)
                log.warning("dpm: %s (dialogue %s, utterance %s)", issue["problem"], utterance.dialogue_id,
                            utterance.utterance_id)
                break
            for p, g in zip(params, grads):
                p.grad = g
            self._opt.step()
            self._opt.zero_grad(set_to_none=True)
            done += 1
        cost = self.test_time_cost
        cost["test_time_updates"] = cost.get("test_time_updates", 0) + done
        cost["test_time_update_seconds"] = cost.get("test_time_update_seconds", 0.0) + time.perf_counter() - t0
        return probs

    # ------------------------------------------------------------------ parameters and fitted state
    def trained_parameters(self):
        return {**self.task_params, **{f"unit_head.{n}": p for n, p in self.unit_head.named_parameters()}}

    def fitted_state(self) -> dict[str, torch.Tensor]:
        state = {f"temp_init.{n}": v for n, v in self.temp_init.items()}
        if self.codebook is not None:
            state["codebook"] = self.codebook
        return state

    def load_fitted_state(self, state: dict[str, torch.Tensor]) -> None:
        for n in self.temp_init:
            self.temp_init[n] = state[f"temp_init.{n}"].clone()
        self.codebook = state["codebook"].clone() if "codebook" in state else None
        self._frozen = self.codebook is not None
        self._set_requires_grad()
        self.reset()
