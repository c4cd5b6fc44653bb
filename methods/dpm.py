"""``dpm``: Dynamic Parameter Memory (Mai et al., the DPM paper, Sec. 3 and Algorithm 1).

A temporary LoRA, trained at test time utterance by utterance on the dialogue's audio, is the memory.

**Audio tokens (the suite's reading).** The paper's emotion SLLM consumes and predicts discrete audio
tokens (CosyVoice2, 25 Hz). Our backbones take continuous audio-token embeddings, so here the audio
"tokens" are discrete *units*: a k-means codebook (``n_units`` centroids, scikit-learn
``MiniBatchKMeans``) fitted on the frozen audio features ``[T, F]`` of the training split
(``backbone.audio_features``: the audio-token embeddings, F = D, wherever the projector is frozen;
the projector's input where it trains with the task LoRA, so the unit targets never move with it;
like HuBERT units); each audio token's unit is its nearest centroid. The LM still reads the
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
  verbalizer tokens) in the suite's prompt, whose audio is L_e's prefix: as Eq. 5-6 say, the ``n_q``
  stream tokens before the emotion identifier, including <audio_end>, across utterance boundaries
  ("the current sentence and its history"; ``emotion_prefix="history"``, the paper preset's; n_q is
  not given by the paper: n_p + n_o); prediction reads the same prefix. ``emotion_prefix="utterance"``
  reads the current utterance alone, so the temporary LoRA is the only way the history reaches a
  prediction (``dpm[utterance-prefix]``, the ``smoke`` and ``default`` presets' until measured).

On a backbone whose random audio projector trains with the task LoRA (the pretrained-LM backbone),
Phase 1 starts, as ``lora``'s does, with the alignment stage (the projector alone, the LM frozen and
its adapters off, dev-selected; :func:`benchbench.training.align_projector`) and warms its rates up
(``lora.warmup``): the paper's SLLM has a trained projector, which a random one is not.

**Inference (Sec. 3.2, Algorithm 1).** Per dialogue a fresh temporary LoRA (r=64, alpha=64, all
linear layers of the LM, AdamW lr 5e-5, betas (0.9, 0.999), eps 1e-7 after Temp-LoRA) sits on top
of the frozen task LoRA (peft, two active adapters; their outputs add). For utterance i, in the
paper's order (Sec. 3.2: "we update the temporary LoRA parameters one last time and predict"):

1. the temporary LoRA takes ``test_time_steps`` AdamW step(s) on ``L_t`` (Eq. 8-9): next-unit
   cross-entropy of utterance i's units and <audio_end> given the ``n_r`` stream tokens before it
   (teacher forced inside the utterance; Eq. 11 at the stream's start). Audio only, never a label;
2. y_i is predicted with the temporary LoRA so updated.

``order="predict_first"`` swaps the two (y_i from the temporary LoRA of utterances < i), labelled
``dpm[predict-first]``; the ``smoke`` and ``default`` presets keep it (measured over three seeds on
``synthetic`` and Emo-DB: no difference to the paper's order; ``results/forms-*``).

At the dialogue's end it is discarded: :meth:`reset` restores its initial values (A drawn once per
method from its seed, B = 0, so a fresh temporary LoRA leaves the task LoRA's outputs bit-identical)
and a new optimizer. Algorithm 1 skips the update for a sample's first sentence (it has no prefix);
here the first utterance is also written to memory, with only the within-utterance prefix, because a
speaker's first utterance is part of the dialogue's evidence. ``n_o``, ``n_p`` and ``n_r`` are not
given in the paper: the defaults are ours (2 s and 4 s of 25 Hz tokens; the CPU-sized ``default``
preset reads n_r = 10 tokens, 0.4 s, before the utterance: an update costs about 2 x (n_r + T + 1)
token-forwards against the prediction's prompt + T, so n_r sets DPM's cost. Measured (README,
"Speed"): at d=1024 dpm / lora is 4.03x at n_r = 25 and 3.09x at n_r = 10, and on the synthetic
task the two reach the same WA (52.78 and 52.43 over seeds 0-2, per-dialogue Wilcoxon p = 0.66);
untested on real speech, where ``--set dpm.n_r=...`` or ``bench sweep`` choose it).

**The temporary LoRA's rate depends on the LM width** (``temp_lr_width``, set by the ``default``
preset; a departure from the paper, whose 5e-5 is for its 4096-wide LM). AdamW's first steps move
every element of the fresh adapter by about the learning rate, whatever the gradient's scale, so a
rate tuned on one width overwrites a wider LM's state. The ``default`` preset's 3e-3 was set on the
64-wide tiny LM; at the 384-wide ``qwen2-audio-whisper-tiny`` it cost Emo-DB fold 0 16 WA points
against the same model without test-time updates (0.519 vs 0.679), while 3e-4 gained 2.5 (0.704)
and 1e-4 changed nothing. Scaled as 64 / D it is 5e-4 there (and about the paper's 5e-5 at 4096):
Emo-DB over 5 folds went from 42.7 to 74.0 WA, beside lora's 73.8 (README, "Pretrained audio encoders").

**Cost.** Every test utterance costs one LM forward for the prediction plus one forward and
backward through the LM per update, ``stream_batch`` dialogues side by side (:class:`StreamLoRA`);
``test_time_cost`` reports the updates and their milliseconds per utterance (the prediction
included), and the harness logs them beside the other costs. A non-finite test-time loss (or
gradient) skips that update, is recorded in ``test_time_issues`` with its dialogue and utterance, and
the run goes on.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from benchbench.backbone import AUDIO_BOS, AUDIO_EOS, Segment
from benchbench.data import Dialogue, UtteranceInput
from benchbench.method import ContextMethod, FitReport, MethodConfig, ProgressFn, UtteranceLevelMethod, check_ranges
from benchbench.training import (LM_LINEAR_LAYERS, BestCheckpoint, LoRASettings, align_projector, attach_lora,
                                 auxiliary_rng, lora_search_space, projector_parameters, run_epochs,
                                 utterance_examples, warmup_schedule)

log = logging.getLogger(__name__)


def _paper_task_lora() -> LoRASettings:
    # DPM Sec. 4.2: the emotion SLLM's LoRA r=64, alpha=64 on all linear layers, lr 5e-5, 20 epochs, batch 1
    return LoRASettings(r=64, alpha=64, lr=5e-5, epochs=20, batch_size=1)


ORDERS = ("update_first", "predict_first")
"""DPM's order at each utterance (:attr:`DPMConfig.order`): the paper's, then the suite's earlier one."""
EMOTION_PREFIXES = ("history", "utterance")
"""What L_e and the prediction read (:attr:`DPMConfig.emotion_prefix`): the paper's, then the suite's earlier one."""


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
    # the LM width D at which temp_lr holds; None: temp_lr as given. Set, the rate used is
    # temp_lr * temp_lr_width / D (AdamW's first steps move every element by about the rate, so a
    # rate set on one width overwrites a wider LM's state: the `default` preset's 3e-3 at D = 64 is
    # 5e-4 at D = 384 and 4.7e-5 at D = 4096, the paper's 5e-5 on its 7B model)
    temp_lr_width: int | None = None
    temp_eps: float = 1e-7         # AdamW eps (Temp-LoRA)
    test_time_steps: int = 1       # updates per utterance (the paper: one)
    # at utterance i: "update_first" (the paper, Sec. 3.2: "we update the temporary LoRA parameters one
    # last time and predict"): the temporary LoRA is updated on utterance i's audio, then predicts y_i;
    # "predict_first": y_i from the temporary LoRA of utterances < i, then the update (dpm[predict-first])
    order: str = "update_first"
    # L_e's prefix (Eq. 5-6): "history", the n_q stream tokens before the emotion identifier, including
    # <audio_end>, across utterance boundaries ("the current sentence and its history"), in training and
    # at prediction; "utterance": the current utterance alone (dpm[utterance-prefix]), so the history
    # reaches a prediction through the temporary LoRA only
    emotion_prefix: str = "history"
    n_q: int = 150                 # L_e's prefix length in stream tokens (the paper gives none: n_p + n_o)
    stream_batch: int = 4          # dialogues streamed side by side, each with its own temporary LoRA (memory!)
    unit_head_lr: float | None = None  # None: the task LoRA's lr

    def check(self) -> None:
        check_ranges(self, at_least=dict(n_units=1, kmeans_max_frames=1, n_o=1, n_p=0, n_r=1, temp_r=1,
                                         test_time_steps=1, stream_batch=1),
                     positive=("temp_alpha", "temp_lr", "temp_eps", "unit_head_lr", "temp_lr_width"),
                     fraction=("temp_dropout",))
        if self.order not in ORDERS:
            raise ValueError(f"dpm: order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.emotion_prefix not in EMOTION_PREFIXES:
            raise ValueError(f"dpm: emotion_prefix must be one of {', '.join(EMOTION_PREFIXES)}, "
                             f"got {self.emotion_prefix!r}")
        check_ranges(self, at_least=dict(n_q=1))


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


class StreamLoRA:
    """The temporary LoRA of S dialogues at once: DPM's memory, one per dialogue, trained side by side.

    For every target linear layer ``W [out, in]`` of the LM (matched by the last part of its name, as
    peft matches ``target_modules``; a peft LoRA layer counts as its linear layer) it holds
    ``A [S, r, in]`` and ``B [S, out, r]`` and, through a forward hook, adds to the layer's output for
    batch item b of dialogue ``streams[b]`` the LoRA term (Hu et al.)::

        (alpha / r) * dropout(x_b) A_s^T B_s^T          x_b: [L, in] -> [L, out]

    peft cannot express this (its mixed-batch adapters serve inference only, by name; here every
    dialogue's adapter is trained at every utterance), so the temporary LoRA is ours while the task
    LoRA stays peft's. With :attr:`streams` ``None`` the hooks add nothing (Phase 1, ``lora``-style
    scoring). Parameters are float32 whatever the LM's dtype. A is drawn as peft draws ``lora_A``
    (Kaiming-uniform, a = sqrt(5)); B starts at 0, so a fresh temporary LoRA changes nothing.

    Because each dialogue's parameters only ever see its own items, one AdamW over the stacked
    tensors (elementwise; every dialogue steps at every turn from turn 0) trains each exactly as a
    separate optimizer would.
    """

    def __init__(self, lm: nn.Module, target_modules: Sequence[str], r: int, alpha: float, dropout: float):
        self.scale, self.dropout = alpha / r, dropout
        self.streams: torch.Tensor | None = None  # [B] dialogue index of each batch item
        targets = set(target_modules)
        self.layers = {n: m for n, m in lm.named_modules()
                       if n.rsplit(".", 1)[-1] in targets and (isinstance(m, nn.Linear) or hasattr(m, "base_layer"))}
        if not self.layers:
            raise ValueError(f"dpm: temporary LoRA target modules {sorted(targets)} matched no layer")
        self.init = {}
        for n, m in self.layers.items():
            a = torch.empty(1, r, m.in_features)
            nn.init.kaiming_uniform_(a[0], a=math.sqrt(5))
            self.init[f"{n}.A"], self.init[f"{n}.B"] = a, torch.zeros(1, m.out_features, r)
        self.params: dict[str, nn.Parameter] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]
        self.start(1)

    def start(self, n_streams: int) -> None:
        """Fresh temporary LoRAs (the initial values) for ``n_streams`` dialogues."""
        device = next(iter(self.layers.values())).weight.device
        self.params = {k: nn.Parameter(v.to(device).expand(n_streams, *v.shape[1:]).clone())
                       for k, v in self.init.items()}

    def _hook(self, name: str):
        def hook(module, args, out):
            if self.streams is None:
                return None
            x = nn.functional.dropout(args[0], self.dropout, module.training).float()   # [B, L, in]
            # index_select: its backward sums the duplicate reads (prompt and window of a dialogue) in
            # a fixed order (advanced indexing's accumulation is not deterministic on CPU)
            A = torch.index_select(self.params[f"{name}.A"], 0, self.streams)
            B = torch.index_select(self.params[f"{name}.B"], 0, self.streams)
            return out + (self.scale * torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2))).to(out.dtype)
        return hook


class DynamicParameterMemory(ContextMethod):
    """Task LoRA + unit head (Phase 1), then a per-dialogue temporary LoRA trained at test time."""

    name = "dpm"
    config_cls = DPMConfig
    uses_context = True
    presets = {
        "smoke": dict(lora=dict(r=8, alpha=16, lr=2e-3, epochs=1, batch_size=16, align_epochs=1), n_units=16,
                      n_o=8, n_p=8, n_r=16, temp_r=8, temp_alpha=8, temp_lr=1e-3, stream_batch=8,
                      order="predict_first", emotion_prefix="utterance", n_q=16),
        # CPU-sized: steps scaled to the tiny random-init backbone, like the other methods; predict-first
        # kept by measurement (3 seeds, results/forms-*: no difference to the paper's order on either task)
        "default": dict(lora=dict(r=32, alpha=64, lr=1e-3, epochs=6, batch_size=32), n_units=64,
                        n_o=25, n_p=50, n_r=10, temp_r=16, temp_alpha=16, temp_lr=3e-3, temp_lr_width=64,
                        stream_batch=64, order="predict_first", emotion_prefix="utterance", n_q=75),
    }
    variant_options = ("order", "emotion_prefix")  # dpm[predict-first,utterance-prefix]

    @classmethod
    def variant(cls, config: DPMConfig) -> str:
        """``predict-first`` where y_i is predicted before the update on utterance i (the paper updates,
        then predicts: Sec. 3.2); ``utterance-prefix`` where L_e and the prediction read the current
        utterance alone (the paper: its n_q tokens with the history, Eq. 5-6); comma-joined."""
        return ",".join(v for v, on in (("predict-first", config.order == "predict_first"),
                                        ("utterance-prefix", config.emotion_prefix == "utterance")) if on)

    @classmethod
    def search_space(cls, trial):
        """Phase 1's LoRA and codebook size, then the test-time memory: temporary-LoRA rank, learning
        rate, steps per utterance and prefix length n_r."""
        return {"lora": lora_search_space(trial),
                "n_units": trial.suggest_categorical("n_units", [16, 32, 64, 128]),
                "temp_r": trial.suggest_categorical("temp_r", [8, 16, 32, 64]),
                "temp_lr": trial.suggest_float("temp_lr", 1e-5, 1e-2, log=True),
                "test_time_steps": trial.suggest_int("test_time_steps", 1, 3),
                "n_r": trial.suggest_categorical("n_r", [10, 25, 50, 100, 200])}

    def __init__(self, backbone, labels, config=None, seed=0):
        super().__init__(backbone, labels, config, seed)
        c = self.config
        self.task_params = attach_lora(self.lm, c.lora, adapter_name="task")
        with auxiliary_rng(seed):  # own RNG stream: Phase 1 does not depend on it
            self.temp = StreamLoRA(self.lm.language_model, c.temp_target_modules, c.temp_r, c.temp_alpha,
                                   c.temp_dropout)
            self.unit_head = nn.Linear(self.lm.hidden_size, c.n_units + 1).to(self.lm.lm_head.weight)  # + <audio_end>
        self._frozen = False  # True once Phase 1 is done (Algorithm 1, line 1)
        self._memory_on = True  # False inside task_lora_only()
        self._set_requires_grad()
        self.codebook: torch.Tensor | None = None  # [n_units, D], fitted in Phase 1
        self.reset()

    # ------------------------------------------------------------------ units
    def fit_codebook(self, train: Sequence[Dialogue]) -> None:
        """k-means over the training split's audio-token embeddings (seeded; ``ValueError`` if the split
        has fewer audio tokens than ``n_units``)."""
        from sklearn.cluster import MiniBatchKMeans

        frames = torch.cat([self.backbone.audio_features(u.input) for d in train for u in d.utterances])
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
        """Unit ids ``[T]`` (nearest centroid) of audio features ``[T, F]`` (:meth:`fit_codebook`)."""
        if self.codebook is None:
            raise RuntimeError("dpm: not fitted (no unit codebook)")
        return torch.cdist(emb.float()[None], self.codebook.float()[None])[0].argmin(-1)

    def _utterance_tokens(self, utt: UtteranceInput) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(audio embeddings ``[T, D]``, stream embeddings ``[T + 1, D]`` with <|audio_eos|>, units ``[T + 1]``)."""
        emb = self.audio_embeddings(utt)
        eos = self.lm.text_embeddings(self.backbone.prompt.audio_eos or self.lm.tokenizer.eos_token or AUDIO_EOS)
        eos = eos[-1:].to(device=emb.device, dtype=emb.dtype)  # one <audio_end> position
        units = torch.cat([self.units(self.backbone.audio_features(utt)),
                           torch.tensor([self.config.n_units])])  # <audio_end> = unit K
        return emb, torch.cat([emb, eos]), units

    # ------------------------------------------------------------------ the autoregressive unit loss
    def _unit_windows(self, windows: Sequence[tuple[torch.Tensor, torch.Tensor, int]],
                      prompts: Sequence[torch.Tensor] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean next-unit cross-entropy over a batch of windows, and the label logits of ``prompts``
        from the same LM forward.

        Each window is ``(emb [n, D], units [n], n_scored)``: the LM reads ``[<|audio_bos|>; emb[:-1]]``
        and position j predicts ``units[j]``; the last ``n_scored`` predictions are scored (Eq. 3 / 9).
        Each prompt is the audio of L_e's prefix ``[T, D]`` (:meth:`_emotion_prompt`: the utterance, or the
        n_q stream tokens with its history) in the suite's prompt (as ``lora`` reads an utterance). All are right-padded into one batch. Returns each window's mean ``[W]`` and the
        label logits ``[P, C]`` (``None`` without prompts).
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
        return (torch.stack(losses) if losses else h.new_zeros(0)), logits

    def _emotion_prompt(self, emb: torch.Tensor, stream: torch.Tensor) -> torch.Tensor:
        """L_e's and the prediction's audio (Eq. 5-6): the current utterance's embeddings ``emb [T, D]``
        (``emotion_prefix="utterance"``), or the last n_q stream tokens up to and including the current
        utterance's <audio_end> (``stream [n, D]`` ends with it), with the history before the utterance
        and its end markers: ``[min(n_q, n) - 1, D]`` (the prompt's own audio end marker takes the last
        place; Eq. 6 at the stream's start)."""
        if self.config.emotion_prefix == "utterance":
            return emb
        n = stream.shape[0]
        return stream[max(0, n - self.config.n_q):n - 1]

    def _phase1_window(self, emb: torch.Tensor, units: torch.Tensor, end: int):
        """Eq. 3-4: the last n_o tokens up to ``end`` (exclusive) and the n_p before them."""
        n_o = min(self.config.n_o, end)
        start = max(0, end - n_o - self.config.n_p)
        return emb[start:end], units[start:end], n_o

    # ------------------------------------------------------------------ Phase 1 (Sec. 3.1)
    def fit(self, train, dev, progress: ProgressFn | None = None) -> FitReport:
        c, s = self.config, self.config.lora
        self.fit_codebook(train)

        def dialogue_examples(d):
            """(L_e's prompt audio [T, D], label, L_a window) of each scored utterance of ``d``."""
            toks = [self._utterance_tokens(u.input) for u in d.utterances]
            stream_emb, stream_units = torch.cat([t[1] for t in toks]), torch.cat([t[2] for t in toks])
            out, end = [], 0
            for (emb, _, units), u in zip(toks, d.utterances):
                end += units.shape[0]
                if not u.scored:  # context-only: in the stream, never an L_e target
                    continue
                out.append((self._emotion_prompt(emb, stream_emb[:end]), u.label,
                            self._phase1_window(stream_emb, stream_units, end)))
            return out

        # where the projector trains with the task LoRA (trainable_projector) the embeddings are
        # projected anew inside each step's loss; elsewhere they are fixed and computed once
        examples = [(i, k) for i, d in enumerate(train) for k in range(sum(u.scored for u in d.utterances))]
        fixed = None if self.lm.audio_projector is not None else [dialogue_examples(d) for d in train]
        trained = self.trained_parameters()
        opt = torch.optim.AdamW([{"params": list(self.task_params.values())},
                                 {"params": list(self.unit_head.parameters()),
                                  "lr": c.unit_head_lr if c.unit_head_lr is not None else s.lr}],
                                lr=s.lr, weight_decay=s.weight_decay)
        report = FitReport()
        projector = projector_parameters(self.task_params)
        if projector and s.align_epochs:  # a random projector: aligned first, as in lora's Phase 1
            align_projector(self, projector, s, utterance_examples(self.backbone, train), dev, progress, report)
        schedule = warmup_schedule(opt, s, s.epochs * math.ceil(len(examples) / s.batch_size)) if projector else None

        def batches():
            perm = self.rng.permutation(len(examples))
            for i in range(0, len(perm), s.batch_size):
                chunk = [examples[j] for j in perm[i:i + s.batch_size]]
                if fixed is not None:
                    yield [fixed[d][k] for d, k in chunk]
                else:
                    dialogues = {d: dialogue_examples(train[d]) for d in dict.fromkeys(d for d, _ in chunk)}
                    yield [dialogues[d][k] for d, k in chunk]

        def loss(chunk):
            # L_e's prompts and L_a's windows in one LM forward
            losses_a, logits = self._unit_windows([w for _, _, w in chunk], prompts=[e for e, _, _ in chunk])
            loss_a = losses_a.mean()                                                            # Eq. 3
            loss_e = nn.functional.cross_entropy(logits, torch.tensor([y for _, y, _ in chunk],
                                                                      device=logits.device))  # Eq. 5
            return 0.5 * (loss_a + loss_e), {"loss_a": loss_a, "loss_e": loss_e}              # Eq. 7

        def step(value):
            grads = torch.autograd.grad(value, list(trained.values()))  # the temporary LoRA is not trained here
            for p, g in zip(trained.values(), grads):
                p.grad = g
            opt.step()
            opt.zero_grad()
            if schedule is not None:
                schedule.step()

        run_epochs(self, report, "dpm", s.epochs, dev, s.selection_metric,  # dev scored by DPM inference
                   BestCheckpoint.of_parameters(trained), batches, loss, step, [self.lm, self.unit_head], progress)
        self._frozen = True  # Algorithm 1, line 1: freeze the SLLM and its LoRA
        self._set_requires_grad()
        self.lm.eval()
        self.reset()
        return report

    # ------------------------------------------------------------------ inference (Sec. 3.2, Algorithm 1)
    @property
    def temp_lr(self) -> float:
        """The temporary LoRA's learning rate on this LM: ``temp_lr``, scaled by ``temp_lr_width / D``
        when ``temp_lr_width`` is set (the ``default`` preset: 3e-3 at D = 64)."""
        c = self.config
        return c.temp_lr if c.temp_lr_width is None else c.temp_lr * (c.temp_lr_width / self.lm.hidden_size)

    @property
    def temp_params(self) -> dict[str, nn.Parameter]:
        """The temporary LoRA's parameters, ``[S, ...]`` for the S dialogues being streamed."""
        return self.temp.params

    @property
    def temp_init(self) -> dict[str, torch.Tensor]:
        """The initial values of a fresh temporary LoRA, ``[1, ...]`` (A drawn once from the seed, B = 0)."""
        return self.temp.init

    def _start(self, n_streams: int) -> None:
        """Fresh temporary LoRAs (initial values) for ``n_streams`` dialogues, a fresh optimizer and
        empty token streams."""
        self.temp.start(n_streams)
        self._opt = torch.optim.AdamW(list(self.temp.params.values()), lr=self.temp_lr,
                                      betas=(0.9, 0.999), eps=self.config.temp_eps, weight_decay=0.0)
        keep = max(self.config.n_r, self.config.n_q) if self.config.emotion_prefix == "history" else self.config.n_r
        self._streams = [_UnitStream(keep=keep) for _ in range(n_streams)]

    def reset(self) -> None:
        """A fresh temporary LoRA (its initial values, B = 0) with a fresh optimizer; a new stream."""
        self._start(1)

    @contextmanager
    def task_lora_only(self):
        """Predict with the task LoRA alone: the temporary adapter switched off and no test-time
        updates (the "SLLM without DPM" ablation of the paper's Table 1)."""
        self._memory_on = False
        try:
            yield
        finally:
            self._memory_on = True

    def _set_requires_grad(self) -> None:
        """Task LoRA and unit head trainable only until Phase 1 ends."""
        for p in list(self.task_params.values()) + list(self.unit_head.parameters()):
            p.requires_grad_(not self._frozen)

    def _turn(self, active: Sequence[int], utterances: Sequence[UtteranceInput]) -> np.ndarray:
        """Algorithm 1 for one turn of the dialogues ``active`` (indices of the streamed dialogues;
        ``utterances[k]`` is dialogue ``active[k]``'s): each temporary LoRA updated on its own utterance's
        units (Eq. 8-9), then y_i predicted with it (``order="update_first"``, the paper's), or y_i first
        (``predict_first``). Returns the probabilities ``[len(active), C]``; the turn's seconds, the
        prediction's included, go to ``test_time_update_seconds``."""
        t0 = time.perf_counter()
        active = list(active)
        toks = [self._utterance_tokens(u) for u in utterances]
        windows, utterance_of = {}, dict(zip(active, utterances))  # by dialogue index
        prompts = []
        for k, (emb, stream_emb, units) in zip(active, toks):
            st = self._streams[k]
            st.append(stream_emb, units)  # keeps the tokens before this utterance that are ever read
            n = self.config.n_r + units.shape[0]  # L_t's window: n_r tokens, then the utterance (Eq. 8-9, 11)
            windows[k] = (st.emb[-n:], st.units[-n:], units.shape[0])
            prompts.append(self._emotion_prompt(emb, st.emb))
        if self.config.order == "update_first":  # the paper: update on utterance i, then predict y_i
            self._update(active, windows, utterance_of)
            probs = self._predict(active, prompts)
        else:  # dpm[predict-first]: y_i from the temporary LoRA of utterances < i, then the update
            probs = self._predict(active, prompts)
            self._update(active, windows, utterance_of)
        cost = self.test_time_cost
        cost["test_time_update_seconds"] = cost.get("test_time_update_seconds", 0.0) + time.perf_counter() - t0
        return probs

    def _predict(self, active: list[int], prompts: Sequence[torch.Tensor]) -> np.ndarray:
        """y for one turn with each dialogue's temporary LoRA as it stands, from each dialogue's emotion
        prompt (:meth:`_emotion_prompt`): ``[len(active), C]``. No graph: an update's backward covers its
        windows alone (a prediction in the same forward would double it)."""
        self.temp.streams = torch.tensor(active, device=self.lm.lm_head.weight.device)
        try:
            with torch.no_grad():
                logits = self.lm(self.lm.batch([[Segment(e)] for e in prompts]))
        finally:
            self.temp.streams = None
        return torch.softmax(logits.float(), -1).cpu().numpy()

    def _update(self, active: list[int], windows: dict, utterance_of: dict) -> None:
        """``test_time_steps`` AdamW steps of each active dialogue's temporary LoRA on its own
        utterance's units (Eq. 8-9); a non-finite loss or gradient skips that dialogue's update (recorded)."""
        params = list(self.temp.params.values())
        device = self.lm.lm_head.weight.device
        cur = list(active)  # dialogues still updating at this turn (a non-finite update stops one)
        for step in range(self.config.test_time_steps):
            rows = torch.tensor(cur, device=device)  # the updating dialogues' streams, also their gradient rows
            self.temp.streams = rows
            try:
                losses, _ = self._unit_windows([windows[k] for k in cur])
            finally:
                self.temp.streams = None
            grads = torch.autograd.grad(losses.sum(), params)  # each dialogue's LoRA gets its own loss's gradient
            loss_of = dict(zip(cur, losses))
            if step == 0:  # the unit loss before each update (Eq. 8): what the temporary LoRA learns from
                self._diagnose("test_time_unit_loss", losses.detach().float().tolist())
            # one check (one host sync) for every dialogue: its loss and all its gradients finite
            finite = torch.isfinite(losses.detach())
            for g in grads:
                finite &= torch.isfinite(g.index_select(0, rows)).flatten(1).all(1)
            bad = [k for k, ok in zip(cur, finite.tolist()) if not ok]
            # skip this update of those dialogues: their parameters and moments are put back after the step
            # (and of those stopped at an earlier step of this turn, which AdamW's moments would still move)
            saved = {k: ([p.detach()[k].clone() for p in params],
                         [{n: v[k].clone() for n, v in self._opt.state[p].items() if v.dim()} for p in params])
                     for k in bad + [k for k in active if k not in cur]}
            for k in bad:
                u = utterance_of[k]
                issue = {"dialogue_id": u.dialogue_id, "utterance_id": u.utterance_id, "turn": u.turn,
                         "loss": float(loss_of[k].detach()),
                         "problem": "non-finite test-time loss or gradient; update skipped"}
                self.test_time_issues.append(issue)
                log.warning("dpm: %s (dialogue %s, utterance %s)", issue["problem"], u.dialogue_id, u.utterance_id)
                for g in grads:
                    g[k] = 0
            for p, g in zip(params, grads):
                p.grad = g
            self._opt.step()
            self._opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for k, (values, moments) in saved.items():
                    for p, v, m in zip(params, values, moments):
                        p[k] = v
                        for n, x in m.items():
                            self._opt.state[p][n][k] = x
            cur = [k for k in cur if k not in bad]
            cost = self.test_time_cost
            cost["test_time_updates"] = cost.get("test_time_updates", 0) + len(cur)
            if not cur:
                break

    def _diagnose(self, name: str, values: Sequence[float]) -> None:
        """Running mean of a test-time diagnostic in ``test_time_cost`` (results.csv and MLflow):
        ``test_time_unit_loss`` (the unit loss each update starts from, nats) and
        ``test_time_drift_norm`` (the Frobenius distance of a dialogue's temporary-LoRA parameters from
        their initial values at the dialogue's end)."""
        count = self.test_time_cost.get(f"{name}_count", 0)
        mean = self.test_time_cost.get(name, 0.0)
        for v in values:
            count += 1
            mean += (v - mean) / count
        self.test_time_cost[name], self.test_time_cost[f"{name}_count"] = mean, count

    def step(self, utterance: UtteranceInput) -> np.ndarray:
        """Algorithm 1 for one utterance of the dialogue being streamed (:meth:`reset` starts one)."""
        self.lm.eval()
        if not self._memory_on:
            return UtteranceLevelMethod.predict_dialogue(self, [utterance])[0]
        return self._turn([0], [utterance])[0]

    def predict_dialogue(self, utterances: Sequence[UtteranceInput]) -> np.ndarray:
        return self.predict_dialogues([utterances])[0]

    def predict_dialogues(self, dialogues: Sequence[Sequence[UtteranceInput]]) -> list[np.ndarray]:
        """Algorithm 1 for up to ``stream_batch`` dialogues side by side, turn by turn, each with its own
        temporary LoRA (:class:`StreamLoRA`); what streaming each alone with :meth:`step` gives, within
        float rounding. Without the memory (:meth:`task_lora_only`): the task LoRA, batched like ``lora``."""
        self.lm.eval()
        if not self._memory_on:
            return UtteranceLevelMethod.predict_dialogues(self, dialogues)
        out = []
        for i in range(0, len(dialogues), self.config.stream_batch):
            group = dialogues[i:i + self.config.stream_batch]
            self._start(len(group))
            probs = [[] for _ in group]
            for t in range(max((len(d) for d in group), default=0)):
                active = [k for k, d in enumerate(group) if t < len(d)]
                for k, p in zip(active, self._turn(active, [group[k][t] for k in active])):
                    probs[k].append(p)
            out.extend(np.stack(p) if p else np.zeros((0, len(self.labels)), dtype=np.float32) for p in probs)
            with torch.no_grad():  # how far each dialogue's temporary LoRA moved from its initial values
                drift = sum(((v - self.temp.init[k].to(v.device)) ** 2).flatten(1).sum(1).double()
                            for k, v in self.temp.params.items())
            self._diagnose("test_time_drift_norm", drift.sqrt().tolist())
        self.reset()
        return out

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
