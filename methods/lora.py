"""``lora``: peft LoRA on the LM's linear layers, one utterance at a time (no dialogue context).

The task-adaptation baseline of both papers (Titans-as-a-Layer Sec. 3.4, Phase 1: r=32,
alpha=64, AdamW, lr 2e-5, 3 epochs). Also provides the LoRA pieces that ``full_context`` and
``mal`` reuse: :class:`LoRASettings`, :func:`attach_lora` and :func:`train_supervised`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from benchbench.backbone import EmotionLM, Segment
from benchbench.data import Dialogue, UtteranceInput
from benchbench.method import ContextMethod, MethodConfig, ProgressFn
from benchbench.metrics import evaluate

LM_LINEAR_LAYERS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRASettings(MethodConfig):
    """LoRA and its training schedule. Defaults: Titans-as-a-Layer Sec. 3.4, Phase 1."""

    r: int = 32                    # rank r = 32
    alpha: int = 64                # scaling alpha_LoRA = 64
    dropout: float = 0.05
    target_modules: tuple[str, ...] = LM_LINEAR_LAYERS  # all linear layers of the LM blocks
    lr: float = 2e-5               # AdamW, learning rate 2e-5
    weight_decay: float = 0.0
    epochs: int = 3                # three epochs
    batch_size: int = 8            # utterances (or context sequences) per step
    selection_metric: str = "ua"   # dev metric for choosing the best epoch's checkpoint


def lora_search_space(trial, prefix: str = "lora.") -> dict:
    """LoRA's search space: learning rate (log), rank r with alpha = 2r (the papers' ratio), epochs."""
    r = trial.suggest_categorical(f"{prefix}r", [8, 16, 32, 64])
    return {"lr": trial.suggest_float(f"{prefix}lr", 1e-4, 1e-2, log=True), "r": r, "alpha": 2 * r,
            "epochs": trial.suggest_int(f"{prefix}epochs", 1, 8)}


def two_stage_search_space(trial) -> dict:
    """Phase 1's LoRA (under ``lora.``) and a frozen-host Phase 2's epochs and two learning rates
    (``lr`` for the added module, ``gate_lr`` for its gates), as in Titans-as-a-Layer Sec. 3.4."""
    return {"lora": lora_search_space(trial), "epochs": trial.suggest_int("epochs", 1, 10),
            "lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
            "gate_lr": trial.suggest_float("gate_lr", 1e-4, 1e-1, log=True)}


def attach_lora(lm: EmotionLM, s: LoRASettings, adapter_name: str = "task") -> dict[str, nn.Parameter]:
    """Wrap ``lm.language_model`` with a peft LoRA adapter; returns its parameters by name (trainable)."""
    cfg = LoraConfig(r=s.r, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=list(s.target_modules))
    lm.language_model = get_peft_model(lm.language_model, cfg, adapter_name=adapter_name)
    params = {n: p for n, p in lm.named_parameters() if "lora_" in n and f".{adapter_name}." in n}
    if not params:
        raise ValueError(f"LoRA target modules {s.target_modules} matched no layer of the language model")
    for p in params.values():
        p.requires_grad_(True)
    return params


Example = tuple[list[Segment], int]


def dev_epoch_score(method: ContextMethod, dev: Sequence[Dialogue], metric: str, curve: list[float],
                    message: str, progress: ProgressFn | None) -> float:
    """End-of-epoch model selection step: the method's own streaming evaluation on ``dev`` (never
    test), the ``metric`` value appended to ``curve`` and reported as ``progress(message,
    {"dev_<metric>": value})`` (``bench sweep`` prunes on these reports). Returns the value."""
    score = evaluate(method, dev, method.labels)[metric]
    curve.append(score)
    if progress:
        progress(message, {"dev_" + metric: score})
    return score


def utterance_examples(backbone, dialogues: Sequence[Dialogue]) -> list[Example]:
    """One context-free example per scored utterance: ``([Segment(audio [T, D])], label)``."""
    return [([Segment(backbone.audio_embeddings(u.input))], u.label)
            for d in dialogues for u in d.utterances if u.scored]


def train_supervised(method: ContextMethod, params: dict[str, nn.Parameter], s: LoRASettings,
                     examples: Sequence[Example], dev: Sequence[Dialogue], progress: ProgressFn | None,
                     curve_prefix: str = "lora") -> None:
    """AdamW on cross-entropy over label logits; keeps the epoch with the best dev ``selection_metric``.

    Records ``<prefix>_train_loss`` (per step) and ``<prefix>_dev_<metric>`` (per epoch) in
    ``method.curves``; the parameters end at the best dev epoch (dev only, never test).
    """
    lm = method.lm
    opt = torch.optim.AdamW(list(params.values()), lr=s.lr, weight_decay=s.weight_decay)
    losses, dev_scores = method.curves.setdefault(f"{curve_prefix}_train_loss", []), \
        method.curves.setdefault(f"{curve_prefix}_dev_{s.selection_metric}", [])
    best, best_state = -np.inf, None
    # length-grouped batches (like transformers' group_by_length): little padding when example
    # lengths differ (full_context), in a random order of batches
    lengths = np.array([sum(seg.audio.shape[0] for seg in segs) for segs, _ in examples])
    for epoch in range(s.epochs):
        lm.train()
        perm = method.rng.permutation(len(examples))
        perm = perm[np.argsort(lengths[perm], kind="stable")]
        batches = [perm[i:i + s.batch_size] for i in range(0, len(perm), s.batch_size)]
        for b in method.rng.permutation(len(batches)):
            chunk = [examples[j] for j in batches[b]]
            logits = lm(lm.batch([segs for segs, _ in chunk]))
            loss = nn.functional.cross_entropy(logits, torch.tensor([y for _, y in chunk], device=logits.device))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        lm.eval()
        score = dev_epoch_score(method, dev, s.selection_metric, dev_scores,
                                f"{curve_prefix} epoch {epoch + 1}/{s.epochs}", progress)
        if score > best:
            best, best_state = score, {k: p.detach().clone() for k, p in params.items()}
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(best_state[k])
    lm.eval()


class UtteranceLevelMethod(ContextMethod):
    """Shared prediction for methods whose output depends on the current utterance only."""

    uses_context = False

    def reset(self) -> None:
        pass

    @torch.no_grad()
    def predict_dialogue(self, utterances: Sequence[UtteranceInput]) -> np.ndarray:
        self.lm.eval()
        batch = self.lm.batch([[Segment(self.backbone.audio_embeddings(u))] for u in utterances])
        return torch.softmax(self.lm(batch).float(), -1).numpy()

    def step(self, utterance: UtteranceInput) -> np.ndarray:
        return self.predict_dialogue([utterance])[0]


class LoRAMethod(UtteranceLevelMethod):
    """Static task LoRA (Titans-as-a-Layer's "+ LoRA" rows); one utterance at a time."""

    name = "lora"
    config_cls = LoRASettings
    presets = {
        "smoke": dict(lr=2e-3, epochs=1, batch_size=16),
        # CPU-sized: the tiny random-init backbone needs a larger step than the 7B paper setting
        "default": dict(lr=1e-3, epochs=6, batch_size=32),
    }

    def __init__(self, backbone, labels, config=None, seed=0):
        super().__init__(backbone, labels, config, seed)
        self.lora_params = attach_lora(self.lm, self.config)

    @classmethod
    def search_space(cls, trial):
        return lora_search_space(trial, prefix="")

    def fit(self, train, dev, progress=None):
        train_supervised(self, self.lora_params, self.config, utterance_examples(self.backbone, train), dev, progress)

    def trained_parameters(self):
        return self.lora_params
