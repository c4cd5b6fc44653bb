"""``ttt``: a test-time-training layer (Sun et al., 2024, "Learning to (Learn at Test Time): RNNs with
Expressive Hidden States", Sec. 2) as a memory branch of the frozen, LoRA-tuned host.

The hidden state is a model f with fast weights W, trained at test time by one gradient step per
mini-batch on a self-supervised reconstruction loss of learned views of its input, then read by the
next mini-batch. Here a mini-batch is one utterance: with h_{i,l} ``[T_i, D]`` the audio-token hidden
states of utterance i before LM block l and z_i = W_in h_{i,l} ``[T_i, d_m]``,

    l(W; z_t) = mean_d (f(theta_K z_t; W) - theta_V z_t)^2                    (TTT Eq. 4, the views)
    eta_t     = eta_base * sigmoid(theta_lr z_t) / T_i                         (TTT Sec. 2.7, learnable eta)
    W_i       = W_{i-1} - sum_t eta_t grad_W l(W_{i-1}; z_t)                   (TTT Eq. 7, mini-batch GD)
    r_i       = f(theta_Q z_i; W_{i-1})                                        (TTT Eq. 5, the read-out)
    h~_{i,l}  = h_{i,l} + tanh(alpha_l) W_out r_i                              (MAL's injection, Eq. 9)

f is TTT-Linear, f(x) = x + LN(x W) (``model="linear"``), or TTT-MLP, f(x) = x + LN(GELU(x W_1) W_2)
with a 4x hidden layer (``model="mlp"``); W_0, theta_K, theta_V, theta_Q, theta_lr are outer-loop
parameters trained in Phase 2 with W_in, W_out and the gate alpha. Every gradient of utterance i's
update is taken at W_{i-1}, the weights after the previous utterance (TTT's mini-batch rule), and
utterance i reads W_{i-1}: Eq. 1 of Titans-as-a-Layer (y_i = f(x_i, S_{i-1})).

This is Titans' update without momentum, without weight decay and without persistent tokens, so it is
built on titans-pytorch's ``NeuralMemory`` (the package the suite's Titans memories use), configured to
be exactly that: ``momentum=False``; the learned forgetting gate replaced by a constant 0 (its
``to_decay_factor`` returns -inf before the sigmoid, so the associative scan is the plain sum
W_i = W_0 + sum_j update_j); N_p = 0; one utterance per titans-pytorch mini-batch (``ttt_batch_size``,
the ``sequential`` surprise of the Titans memories); the per-token step divided by the utterance's
length (:class:`_MeanStep`), so each update is the mean over the mini-batch as in TTT; no clipping of
the inner gradient (``inner_grad_norm=None``, TTT has none). The update is tested against a step
computed by hand (``tests/test_new_memories.py``).

Departures from the TTT paper (labelled in docs/fidelity.md): titans-pytorch's memory MLP has no biases
and its LayerNorm gain is a fast weight (TTT keeps LN's parameters in the outer loop); the inner loss is
the mean over d_m (TTT's sum, with eta divided by the head dimension, is the same up to eta_base's
scale); TTT's ``mini_batch_size`` is 16 tokens inside a sequence, ours one utterance (the unit the
papers' Eq. 1 updates at); there is no causal dual form inside an utterance: its tokens read W_{i-1}.

``eta_base`` follows ttt-lm-pytorch (``ttt_base_lr`` = 1.0 for TTT-Linear); 0.1 for TTT-MLP (TTT's
Sec. 3, the MLP's larger gradients). The shared two-stage schedule, placement, memory streams and
dialogue reset are :mod:`benchbench.methods.titans_memory`'s. Test-time cost: every test utterance
takes one inner gradient step per branch; ``test_time_cost`` counts them (``test_time_updates``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from titans_pytorch import NeuralMemory
from torch import nn

from benchbench.methods.titans_memory import (BranchMemoryConfig, MemoryBranch, TitansMemoryMethod, _ChunkMean,
                                              StreamLayout)
from benchbench.method import ConfigValueError, check_ranges
from benchbench.training import phase1_presets, two_stage_search_space

MODELS = {"linear": 1, "mlp": 2}
"""TTT's inner models and their depth in titans-pytorch's ``MemoryMLP`` (TTT-Linear, TTT-MLP)."""


@dataclass
class TTTConfig(BranchMemoryConfig):
    """``ttt``'s config: the shared branch schedule plus TTT's inner model and step size."""

    model: str = "linear"          # TTT-Linear (paper default); "mlp": TTT-MLP (2 layers, 4x hidden, GELU)
    eta_base: float | None = None  # eta_base; None: 1.0 for TTT-Linear, 0.1 for TTT-MLP (ttt_base_lr)
    inner_grad_norm: float | None = None  # optional soft clip of the inner gradient (TTT: none)

    def check(self) -> None:
        super().check()
        check_ranges(self, positive=("eta_base", "inner_grad_norm"), choices=dict(model=tuple(MODELS)))

    @property
    def eta(self) -> float:
        """eta_base as used: the option, or the inner model's default."""
        return self.eta_base if self.eta_base is not None else (1.0 if self.model == "linear" else 0.1)


class _NoDecay(nn.Module):
    """Stands in for ``NeuralMemory.to_decay_factor``: logits of -inf, so the forgetting gate
    sigmoid(.) is exactly 0 and the weights accumulate every update (no weight decay). ``[b, n, d] ->
    [b * heads, n, 1]``."""

    def __init__(self, heads: int):
        super().__init__()
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.new_full((b * self.heads, n, 1), -math.inf)


class _MeanStep(nn.Module):
    """TTT's learnable step eta_t = eta_base * sigmoid(theta_lr z_t) / T (``adaptive_step_transform``):
    divided by the real tokens T of the token's mini-batch (one utterance), set per call as a
    ``[S, L_s]`` divisor; a call split into mini-batches (``ttt_batch_size``) consumes its columns in
    order. Without a divisor (a call not from :meth:`MemoryBranch.read`): eta_base * sigmoid."""

    def __init__(self, eta_base: float):
        super().__init__()
        self.eta_base = eta_base
        self.divisor: torch.Tensor | None = None
        self.offset = 0

    def set_divisor(self, divisor: torch.Tensor | None) -> None:
        self.divisor, self.offset = divisor, 0

    def forward(self, logits: torch.Tensor) -> torch.Tensor:  # [b, n]
        eta = logits.sigmoid() * self.eta_base
        d = self.divisor
        n = logits.shape[-1]
        if d is None or d.shape[0] != logits.shape[0] or self.offset + n > d.shape[1]:
            return eta
        part = d[:, self.offset:self.offset + n]
        self.offset += n
        return eta / part.to(eta)


class TTTBranch(MemoryBranch):
    """One TTT layer for one LM block: ``read(x [n_tok, D], layout, state) -> (W_out r [n_tok, D], state)``
    with the fast weights carried per memory stream; MAL's gated residual ``inject``."""

    def __init__(self, hidden_size: int, c: TTTConfig, max_tokens: int):
        nn.Module.__init__(self)
        self.n_p, self.max_tokens, self.chunk_size, self.surprise = 0, max_tokens, "utterance", "sequential"
        self.W_in = nn.Linear(hidden_size, c.d_m, bias=False)
        self.W_out = nn.Linear(c.d_m, hidden_size, bias=False)
        self.P = nn.Parameter(torch.zeros(0, c.d_m))  # no persistent tokens
        self.step_size = _MeanStep(c.eta)
        self.memory = NeuralMemory(
            dim=c.d_m, chunk_size=1, heads=1, momentum=False, adaptive_step_transform=self.step_size,
            default_model_kwargs=dict(depth=MODELS[c.model], expansion_factor=4.0), max_grad_norm=c.inner_grad_norm)
        self.memory.to_decay_factor = _NoDecay(1)
        self.memory.reduce_to_chunk_rep = _ChunkMean()
        self.alpha = nn.Parameter(torch.zeros(()))  # tanh(0) = 0: the untrained branch is the identity

    def gate_parameters(self):
        return [self.alpha]

    def read(self, x: torch.Tensor, layout: StreamLayout, state=None):
        # every position of a chunk (one utterance) divides its step by the chunk's real tokens
        self.step_size.set_divisor(layout.counts.clamp(min=1).repeat_interleave(layout.chunk, dim=1))
        try:
            return super().read(x, layout, state)
        finally:
            self.step_size.set_divisor(None)

    def inject(self, h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.alpha).to(delta.dtype).expand(*delta.shape[:-1], 1) * delta


class TestTimeTraining(TitansMemoryMethod):
    """TTT layers (TTT-Linear / TTT-MLP) on the audio-token hidden states of LM blocks, MAL's gated
    residual; the fast weights are the per-dialogue (per-speaker) state."""

    name = "ttt"
    config_cls = TTTConfig
    branch_cls = TTTBranch
    variant_options = ("speaker_memory", "model")
    presets = phase1_presets({
        "smoke": dict(d_m=16, epochs=1, lr=3e-3, gate_lr=1e-2, batch_dialogues=8),
        # the CPU-sized values of mal's default preset (same width, steps, streams), so ttt and mal differ
        # in the memory alone
        "default": dict(d_m=16, epochs=3, lr=3e-3, gate_lr=5e-2, batch_dialogues=8, speaker_memory=True),
    })

    @classmethod
    def variant(cls, config: TTTConfig) -> str:
        """``speaker`` with one state per speaker; ``mlp`` for TTT-MLP (TTT-Linear is the paper's main
        form and unlabelled): ``ttt[speaker,mlp]``."""
        return ",".join(v for v, on in (("speaker", config.speaker_memory), ("mlp", config.model == "mlp")) if on)

    @classmethod
    def search_space(cls, trial):
        """Phase 1's LoRA, then the TTT layer: width d_m, inner model, eta_base, placement, Phase 2's
        epochs and learning rates."""
        return {**two_stage_search_space(trial),
                "d_m": trial.suggest_categorical("d_m", [16, 32, 64, 128]),
                "model": trial.suggest_categorical("model", list(MODELS)),
                "eta_base": trial.suggest_float("eta_base", 0.01, 1.0, log=True),
                "layers": trial.suggest_categorical("layers", ["all", "quartile", "0"])}

    def _layout_options(self):
        return 0, "utterance"

    def _count_updates(self, n_utterances: int) -> None:
        cost = self.test_time_cost
        cost["test_time_updates"] = cost.get("test_time_updates", 0) + n_utterances * len(self.branches)

    def predict_dialogues(self, dialogues: Sequence[Sequence]) -> list[np.ndarray]:
        """As :meth:`TitansMemoryMethod.predict_dialogues`; every utterance also counts one inner
        gradient step per branch (``test_time_updates``) when the memory is on."""
        out = super().predict_dialogues(dialogues)
        if not self._memory_removed:
            self._count_updates(sum(len(d) for d in dialogues))
        return out

    def step(self, utterance):
        out = super().step(utterance)
        if not self._memory_removed:
            self._count_updates(1)
        return out

    def mean_gate(self) -> float:
        """Mean |tanh(alpha_l)| over branches."""
        return float(np.mean([abs(math.tanh(b.alpha.item())) for b in self.branches.values()]))
