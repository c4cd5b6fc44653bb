"""``full_context``: the current utterance with the dialogue's previous utterances in the LM input.

The explicit-context approach both papers argue against: each utterance's input holds the audio
tokens of as many preceding utterances as fit in ``max_context_tokens`` (most recent first), each
under a speaker tag, then the current one. Its cost grows with the dialogue (sequence length up to
the budget).

Two stages, like the memories (neither paper gives a recipe for this baseline): **Phase 1 is
``lora``** (the task LoRA on each utterance alone, replayed from the ``lora`` cell's training), then
**Phase 2 trains the same LoRA further on the context sequences** for ``epochs`` at ``lr``, and dev
selection may keep Phase 1 (the context then unused: the cell's notice; predictions are ``lora``'s).
So ``full_context - lora`` is what the context adds to one utterance model, as ``mal - lora`` is.
Why (measured on Emo-DB, ``qwen2-audio-whisper-tiny``, default preset, seed 0): a LoRA trained on
the context sequences from scratch (this method before) learns slower than on utterances alone:
its dev UA still rose at the last of lora's 6 epochs on every fold (fold 0: 0.25, 0.24, 0.40, 0.34,
0.49, 0.58; 12 epochs: 0.72 at the 12th, at 2.4x the cost) where ``lora``'s peaked, the answer token
reading the current utterance through attention over up to 8x more audio tokens; it scored 61.9 WA
against lora's 73.8 (5 folds).

``context``: ``"dialogue"`` (the papers' setting and the ``paper`` preset) takes every earlier
utterance; ``"speaker"`` (the CPU-sized ``default`` preset) only the current speaker's own earlier
utterances, by the utterance's ``speaker`` metadata. Speaker tags stay those of the whole dialogue.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import numpy as np
import torch

from benchbench.backbone import SPEAKER_TAGS, Segment
from benchbench.data import UtteranceInput
from benchbench.method import ContextMethod, FitReport, MethodConfig, UtteranceLevelMethod, check_ranges
from benchbench.training import (LoRASettings, attach_lora, fit_task_lora, lora_search_space, phase1_presets,
                                 train_supervised)


@dataclass
class FullContextConfig(MethodConfig):
    lora: LoRASettings = field(default_factory=LoRASettings)  # Phase 1 (= lora); Phase 2 trains the same LoRA
    epochs: int = 3                 # Phase 2: epochs on the context sequences (the papers' LoRA schedule)
    lr: float = 2e-5                # Phase 2: AdamW learning rate (the papers' LoRA rate)
    max_context_tokens: int = 4096  # audio tokens of previous utterances kept in the input
    speaker_tags: bool = True       # tag each segment with its speaker (S0, S1, ... in order of appearance)
    # "dialogue": every previous utterance (the papers' explicit context); "speaker": only the current
    # speaker's own previous utterances (the speaker-baseline context)
    context: str = "dialogue"
    # the phase gate (neither paper has it): keep Phase 2 only where it beats Phase 1 on dev (as
    # TwoStageMemoryConfig.phase_gate); off: the papers' protocol, Phase 2 reported
    phase_gate: bool = False

    def check(self) -> None:
        check_ranges(self, at_least=dict(max_context_tokens=0, epochs=0), positive=("lr",),
                     choices=dict(context=("dialogue", "speaker")))


class FullContext(ContextMethod):
    """Concatenated dialogue history in the input: the task LoRA (Phase 1 = ``lora``) trained further
    on the context sequences (Phase 2)."""

    name = "full_context"
    BATCH_TOKENS = 4096  # audio tokens, padding included, per LM forward in predict_dialogues
    config_cls = FullContextConfig
    uses_context = True
    phases = 2
    phase1_of = "lora"
    variant_options = ("context",)  # full_context[speaker]
    # the task LoRA at each preset is `lora`'s (LORA_PRESETS)
    presets = phase1_presets({
        "smoke": dict(max_context_tokens=256, epochs=1, lr=2e-3),
        # CPU-sized; the context is the current speaker's own earlier utterances (the papers' is the
        # whole dialogue: `--preset paper`, or `--set full_context.context=dialogue`); Phase 2 at
        # lora's rate, for 4 epochs
        "default": dict(max_context_tokens=512, context="speaker", epochs=4, lr=1e-3),
    })

    def __init__(self, backbone, labels, config=None, seed=0):
        super().__init__(backbone, labels, config, seed)
        self.lora_params = attach_lora(self.lm, self.config.lora)
        self._context_off = False  # Phase 1, and after it when dev kept Phase 1: each utterance alone
        self.reset()

    @classmethod
    def variant(cls, config: FullContextConfig) -> str:
        """``speaker`` when the context is the current speaker's own history (the papers': the dialogue)."""
        return "speaker" if config.context == "speaker" else ""

    @classmethod
    def search_space(cls, trial):
        """Phase 1's LoRA, then Phase 2's epochs and rate and the context budget."""
        return {"lora": lora_search_space(trial), "epochs": trial.suggest_int("epochs", 1, 8),
                "lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
                "max_context_tokens": trial.suggest_categorical("max_context_tokens", [128, 256, 512, 1024])}

    def activate_context(self, seed: int = 0) -> None:
        """The conformance kit's hook: the context back in the input when dev kept Phase 1."""
        self._context_off = False
        super().activate_context(seed)

    def _segments(self, history: Sequence[UtteranceInput], current: UtteranceInput) -> list[Segment]:
        """Context (most recent utterances within the token budget, in turn order) + current."""
        tags: dict[str, str] = {}
        for u in list(history) + [current]:
            tags.setdefault(u.speaker, SPEAKER_TAGS[len(tags) % len(SPEAKER_TAGS)])

        def seg(u):
            return Segment(self.backbone.audio_features(u), tags[u.speaker] if self.config.speaker_tags else None,
                           features=True)  # projected by the LM as it lays out the input

        if self.config.context == "speaker":
            history = [u for u in history if u.speaker == current.speaker]
        context, budget = [], self.config.max_context_tokens
        for u in reversed(history):
            s = seg(u)
            if s.audio.shape[0] > budget:
                break
            budget -= s.audio.shape[0]
            context.append(s)
        return context[::-1] + [seg(current)]

    def fit(self, train, dev, progress=None) -> FitReport:
        c = self.config
        # Phase 1: the task LoRA on each utterance alone, exactly as `lora` (dev scored the same way)
        self._context_off = True
        report = fit_task_lora(self, self.lora_params, c.lora, train, dev, progress)
        self._context_off = False
        examples = []
        for d in train:
            inputs = d.inputs()
            # every utterance is context; only the scored ones are targets
            examples += [(self._segments(inputs[:i], inputs[i]), d.utterances[i].label)
                         for i in range(len(d)) if d.utterances[i].scored]
        self._phases = {1: self._lora_values()}
        # Phase 2 ends at its dev-best epoch; with the phase gate it replaces Phase 1 only if it beats
        # Phase 1's dev score (each utterance alone, as `lora`)
        train_supervised(self, self.lora_params, replace(c.lora, epochs=c.epochs, lr=c.lr), examples, dev, progress,
                         curve_prefix=self.name, report=report, phase=2, gate=c.phase_gate)
        self._phases[2] = self._lora_values()
        self.use_phase(report.selected["phase"])
        return report

    def _lora_values(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.lora_params.items()}

    def use_phase(self, phase: int) -> None:
        """1: Phase 1's LoRA, each utterance alone (``lora``'s predictions); 2: the LoRA at Phase 2's
        dev-best epoch with the context in the input. Both are kept after :meth:`fit` (and saved as
        fitted state). ``ValueError`` for another phase or before :meth:`fit`."""
        if phase not in (1, 2) or phase not in getattr(self, "_phases", {}):
            raise ValueError(f"use_phase({phase!r}): expected 1 or 2 of a fitted full_context")
        with torch.no_grad():
            for k, p in self.lora_params.items():
                p.copy_(self._phases[phase][k])
        self._context_off = phase == 1

    def reset(self) -> None:
        self.history: list[UtteranceInput] = []

    @torch.no_grad()
    def predict_dialogue(self, utterances: Sequence[UtteranceInput]) -> np.ndarray:
        """All turns in one batch; turn i's input holds only utterances 0..i (causal by construction)."""
        self.reset()
        if self._context_off:
            return UtteranceLevelMethod.predict_dialogues(self, [utterances])[0]
        self.lm.eval()
        seqs = [self._segments(utterances[:i], u) for i, u in enumerate(utterances)]
        return torch.softmax(self.lm(self.lm.batch(seqs)).float(), -1).numpy()

    @torch.no_grad()
    def predict_dialogues(self, dialogues: Sequence[Sequence[UtteranceInput]]) -> list[np.ndarray]:
        """Every turn of every dialogue (each input holding its own dialogue's turns up to it), sorted
        by length into LM batches of at most ``batch_utterances`` inputs and ``BATCH_TOKENS`` audio
        tokens with padding (the contexts' lengths vary tenfold). With the context off (Phase 1, or dev
        kept it): each utterance alone, batched as ``lora``."""
        if self._context_off:
            return UtteranceLevelMethod.predict_dialogues(self, dialogues)
        self.lm.eval()
        seqs = [self._segments(d[:i], u) for d in dialogues for i, u in enumerate(d)]
        lengths = np.array([sum(seg.audio.shape[0] for seg in segs) for segs in seqs])
        order = np.argsort(lengths, kind="stable")
        probs = np.zeros((len(seqs), len(self.labels)), dtype=np.float32)
        batches, cur = [], []
        for j in order:  # ascending length: a batch is full at batch_utterances or BATCH_TOKENS padded tokens
            if cur and (len(cur) == self.batch_utterances or (len(cur) + 1) * lengths[j] > self.BATCH_TOKENS):
                batches.append(cur)
                cur = []
            cur.append(j)
        for idx in batches + [cur] if cur else batches:
            probs[idx] = torch.softmax(self.lm(self.lm.batch([seqs[j] for j in idx])).float(), -1).cpu().numpy()
        return np.split(probs, np.cumsum([len(d) for d in dialogues])[:-1]) if dialogues else []

    @torch.no_grad()
    def step(self, utterance: UtteranceInput) -> np.ndarray:
        if self._context_off:
            return UtteranceLevelMethod.predict_dialogues(self, [[utterance]])[0][0]
        self.lm.eval()
        segs = self._segments(self.history, utterance)
        self.history.append(utterance)
        return torch.softmax(self.lm(self.lm.batch([segs])).float(), -1).numpy()[0]

    def trained_parameters(self):
        return self.lora_params

    def fitted_state(self) -> dict[str, torch.Tensor]:
        # whether Phase 1 (each utterance alone) or Phase 2 (the context in the input) is selected, and
        # both phases' LoRA values (use_phase)
        return {"context_off": torch.tensor(int(self._context_off)),
                **{f"phase{ph}.{k}": v for ph, values in getattr(self, "_phases", {}).items() for k, v in values.items()}}

    def load_fitted_state(self, state: dict[str, torch.Tensor]) -> None:
        self._context_off = bool(state["context_off"]) if "context_off" in state else False
        phases = {ph: {k[len(f"phase{ph}."):]: v.clone() for k, v in state.items() if k.startswith(f"phase{ph}.")}
                  for ph in (1, 2)}
        self._phases = {ph: v for ph, v in phases.items() if v}
