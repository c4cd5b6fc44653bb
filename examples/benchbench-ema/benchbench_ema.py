"""``ema``: the simplest speaker-baseline memory, as a benchbench plugin (CONTRIBUTING.md's worked example).

Question it answers: does Titans' learned neural memory beat a memory with no learning in its state
at all? None of the papers checks this.

Per dialogue the state S is, for every speaker s seen so far, an exponential moving average of that
speaker's mean-pooled audio-token embeddings (the backbone's frozen LM-input audio embeddings):

    e_s <- beta * e_s + (1 - beta) * mean_t h_{i,t}          (after utterance i of speaker s; e_s = first mean)

and utterance i of speaker s is read with a residual at its audio tokens, like MAL's (Eq. 9 of
Titans-as-a-Layer), zero-initialised so that an untrained ``ema`` is exactly its task LoRA:

    h~_{i,t} = h_{i,t} + tanh(alpha) * W (h_{i,t} - e_s),    W: [D, D], alpha = 0 at init

For a speaker's first utterance in the dialogue there is no e_s and the residual is 0. The speaker
id is dialogue metadata (``UtteranceInput.speaker``), never a label; S is reset at every dialogue.
Training follows MAL's two-stage schedule (Sec. 3.4): the task LoRA first (exactly ``lora``), then
frozen while W and alpha train. Because e_s depends only on the frozen embeddings, Phase 2 trains
on utterances in batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from benchbench.backbone import Segment
from benchbench.metrics import METRICS
from benchbench.method import ContextMethod, FitReport, MethodConfig, check_ranges
from benchbench.training import (BestCheckpoint, LoRASettings, attach_lora, auxiliary_rng, fit_task_lora,
                                 phase1_presets, run_epochs, two_stage_search_space)


@dataclass
class EMAConfig(MethodConfig):
    """``ema``'s options (defaults: the paper-scale values MAL uses, where they exist)."""

    lora: LoRASettings = field(default_factory=LoRASettings)  # Phase 1 (Titans-as-a-Layer Sec. 3.4)
    beta: float = 0.5            # EMA decay: weight of the speaker's past vs the newest utterance
    epochs: int = 2              # Phase 2 epochs (W, alpha)
    lr: float = 1e-4             # W: lr, clipping 1.0 (as MAL's memory)
    gate_lr: float = 2e-4        # alpha: lr, clipping 2.0 (as MAL's gates)
    batch_size: int = 32
    selection_metric: str = "ua"
    phase_gate: bool = False     # keep Phase 2 only where it beats Phase 1 on dev (off: the papers' protocol)

    def check(self) -> None:
        """Ranges, checked before any cell runs (``bench run --set ema.beta=1.5`` is refused)."""
        check_ranges(self, at_least=dict(epochs=0, batch_size=1), positive=("lr", "gate_lr"), fraction=("beta",),
                     choices=dict(selection_metric=METRICS))


class SpeakerEMA(ContextMethod):
    """Speaker-EMA residual memory on a frozen task LoRA (see the module docstring)."""

    name = "ema"
    config_cls = EMAConfig
    uses_context = True
    phases = 2  # Phase 1 = lora, Phase 2 = the memory: results report which one dev selected
    phase1_of = "lora"  # its Phase 1 is fit_task_lora: with --executor ray it runs after lora's cell, and replays it
    # Phase 1 at each preset is `lora`'s (benchbench.training.LORA_PRESETS), by construction
    presets = phase1_presets({
        "smoke": dict(epochs=1, lr=3e-3, gate_lr=1e-2),
        "default": dict(epochs=8, lr=3e-3, gate_lr=5e-2),
    })

    @classmethod
    def search_space(cls, trial):
        return {**two_stage_search_space(trial), "beta": trial.suggest_float("beta", 0.0, 0.95)}

    def __init__(self, backbone, labels, config=None, seed=0):
        super().__init__(backbone, labels, config, seed)
        self.lora_params = attach_lora(self.lm, self.config.lora)
        d = self.lm.hidden_size
        with auxiliary_rng(seed):  # Phase 1 stays bit-identical to `lora` under the seed
            self.proj = nn.Linear(d, d, bias=False)           # W
        self.alpha = nn.Parameter(torch.zeros(()))            # gate, tanh(0) = 0
        self._gate_open = True  # False only while Phase 1 scores dev with the host + LoRA alone
        self.reset()

    # ------------------------------------------------------------------ the memory
    def _read(self, h: torch.Tensor, e: torch.Tensor | None) -> torch.Tensor:
        """h~ = h + tanh(alpha) W (h - e_s) for audio tokens ``h [T, D]``; ``h`` itself when e is None."""
        if e is None:
            return h
        # tanh(alpha) as a [T, 1] column, not a scalar broadcast over [T, D]: alpha's gradient is then
        # summed per token first, in an order that does not depend on torch's thread count
        return h + torch.tanh(self.alpha).expand(h.shape[0], 1) * self.proj(h - e)

    def _write(self, state: dict, speaker: str, h: torch.Tensor) -> None:
        pooled = h.mean(0)
        prev = state.get(speaker)
        state[speaker] = pooled if prev is None else self.config.beta * prev + (1 - self.config.beta) * pooled

    def _speaker_baselines(self, dialogue_inputs, embeddings) -> list[torch.Tensor | None]:
        """e_s before each utterance (None for a speaker's first), streaming through one dialogue."""
        state: dict = {}
        out = []
        for u, h in zip(dialogue_inputs, embeddings):
            out.append(state.get(u.speaker))
            self._write(state, u.speaker, h)
        return out

    # ------------------------------------------------------------------ training
    def fit(self, train, dev, progress=None) -> FitReport:
        c = self.config
        self._gate_open = False  # Phase 1: the host + LoRA alone, exactly lora's training (replayed)
        report = fit_task_lora(self, self.lora_params, c.lora, train, dev, progress)
        self._gate_open = True
        for p in self.lora_params.values():
            p.requires_grad_(False)
        examples = []  # (h, e_s, label) for utterances whose speaker has history
        for d in train:
            embs = [self.audio_embeddings(u.input) for u in d.utterances]
            for u, h, e in zip(d.utterances, embs, self._speaker_baselines(d.inputs(), embs)):
                if e is not None and u.scored:
                    examples.append((h, e, u.label))
        opt_w = torch.optim.AdamW(self.proj.parameters(), lr=c.lr)
        opt_g = torch.optim.AdamW([self.alpha], lr=c.gate_lr, weight_decay=0.0)

        def batches():
            perm = self.rng.permutation(len(examples))
            for i in range(0, len(perm), c.batch_size):
                yield [examples[j] for j in perm[i:i + c.batch_size]]

        def loss(chunk):
            logits = self.lm(self.lm.batch([[Segment(self._read(h, e))] for h, e, _ in chunk]))
            return nn.functional.cross_entropy(logits, torch.tensor([y for _, _, y in chunk]))

        def step(value):
            opt_w.zero_grad()
            opt_g.zero_grad()
            value.backward()
            nn.utils.clip_grad_norm_(self.proj.parameters(), 1.0)
            nn.utils.clip_grad_norm_([self.alpha], 2.0)
            opt_w.step()
            opt_g.step()

        # Phase 2 ends at its dev-best epoch; with the phase gate, Phase 1 is selected unless that epoch
        # beat it on dev, and the memory is then switched off (exactly the task LoRA)
        run_epochs(self, report, "ema", c.epochs, dev, c.selection_metric,
                   BestCheckpoint(self._state, self._load_state), batches, loss, step, [self.proj], progress,
                   lambda: {"abs_tanh_alpha": abs(math.tanh(self.alpha.item()))}, phase=2,
                   phase1_score=report.dev_score, gate=c.phase_gate)
        self.use_phase(report.selected["phase"])
        return report

    def use_phase(self, phase: int) -> None:
        """1: the task LoRA alone (the memory off, ``lora``'s predictions); 2: the memory at Phase 2's
        dev-best epoch. The harness predicts the test set under both (the phase gate's audit)."""
        if phase not in (1, 2):
            raise ValueError(f"use_phase: expected phase 1 or 2, got {phase!r}")
        self._gate_open = phase == 2

    def activate_context(self, seed: int = 0) -> None:
        """The kit's hook: the memory on even where Phase 1 was selected, then the default rule (a zero
        alpha opened)."""
        self._gate_open = True
        super().activate_context(seed)

    def fitted_state(self) -> dict[str, torch.Tensor]:
        return {"gate_open": torch.tensor(int(self._gate_open))}

    def load_fitted_state(self, state: dict[str, torch.Tensor]) -> None:
        self._gate_open = bool(state["gate_open"]) if "gate_open" in state else True

    def _params(self) -> dict[str, nn.Parameter]:
        return {"ema.proj.weight": self.proj.weight, "ema.alpha": self.alpha}

    def _state(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self._params().items()}

    def _load_state(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self._params().items():
                p.copy_(state[k])

    def trained_parameters(self):
        return {**self.lora_params, **self._params()}

    # ------------------------------------------------------------------ streaming evaluation (Eq. 1)
    def reset(self) -> None:
        self.state: dict = {}  # S_0: no speaker seen

    @torch.no_grad()
    def step(self, utterance):
        self.lm.eval()
        h = self.audio_embeddings(utterance)
        e = self.state.get(utterance.speaker) if self._gate_open else None
        probs = torch.softmax(self.lm(self.lm.batch([[Segment(self._read(h, e))]])).float(), -1)[0].numpy()
        self._write(self.state, utterance.speaker, h)   # S_i = U(S_{i-1}, x_i), no label
        return probs

    @torch.no_grad()
    def predict_dialogue(self, utterances):
        """Batched: e_s before each turn depends only on earlier turns' embeddings, so this equals
        streaming :meth:`step` turn by turn."""
        self.lm.eval()
        self.reset()
        embs = [self.audio_embeddings(u) for u in utterances]
        base = self._speaker_baselines(utterances, embs) if self._gate_open else [None] * len(embs)
        logits = self.lm(self.lm.batch([[Segment(self._read(h, e))] for h, e in zip(embs, base)]))
        for u, h in zip(utterances, embs):
            self._write(self.state, u.speaker, h)
        return np.asarray(torch.softmax(logits.float(), -1).numpy())
