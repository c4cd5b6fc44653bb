"""``retrieval``: attention over the dialogue's earlier turns, the retrieval half of Memorizing
Transformers (Wu et al., 2022, Sec. 3) at turn granularity, as a memory branch of the frozen,
LoRA-tuned host.

Per LM block l and memory stream (the dialogue, or one speaker of it), a store holds one entry per
earlier utterance j: its audio tokens' hidden states before block l, mean-pooled,
e_j = mean_t h_{j,l,t} ``[D]``. For the current utterance i, with h_{i,l} ``[T_i, D]``:

    q_t   = W_q h_{i,l,t}                   k_j = W_k e_j,   v_j = W_v e_j       (all [d_m])
    a_t   = softmax_j( q_t . k_j / sqrt(d_m) )  over j < i  (the ``top_k`` best j only, if set)
    r_t   = sum_j a_{t,j} v_j                                                   (Memorizing Tr. Eq. 2)
    h~_t  = h_{i,l,t} + tanh(alpha_l) W_out r_t                                 (MAL's injection, Eq. 9)

then e_i joins the store (after the read: utterance i reads turns < i, Eq. 1 of Titans-as-a-Layer).
An empty store (the stream's first utterance) reads r = 0. The store is reset at the dialogue's start.
Trainable in Phase 2: W_q, W_k, W_v, W_out and the gate alpha (zero: the untrained branch is the
identity); the schedule, placement, streams and Phase 1 = ``lora`` are
:mod:`benchbench.methods.titans_memory`'s.

Why exact attention and not a kNN index: Memorizing Transformers keeps up to 262k token memories per
layer and needs approximate kNN (faiss, as ``memorizing-transformers-pytorch``) to search them; a
dialogue here has tens of turns (IEMOCAP's longest about 110, one entry each), so the exact softmax over
all of them costs less than one attention head over the utterance itself, is differentiable end to end
and deterministic. ``top_k`` keeps the paper's top-k form as an option.

Departures from Memorizing Transformers (labelled in docs/fidelity.md): the memory holds one pooled
entry per turn, not every token's key and value; the keys and values are fresh projections of the
stored states (the paper stores the attention layer's own keys and values, and its keys are not
trained through the memory); the read-out enters as MAL's gated residual, not the paper's learned
per-head mix with local attention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from benchbench.method import check_ranges
from benchbench.methods.titans_memory import BranchMemoryConfig, StreamLayout, TitansMemoryMethod
from benchbench.training import phase1_presets, two_stage_search_space


@dataclass
class RetrievalConfig(BranchMemoryConfig):
    """``retrieval``'s config: the shared branch schedule plus the attention's read (``top_k``)."""

    top_k: int = 0   # 0: softmax over every earlier turn; k: over the k best-scoring (Memorizing Tr.'s kNN)

    def check(self) -> None:
        super().check()
        check_ranges(self, at_least=dict(top_k=0))


class RetrievalBranch(nn.Module):
    """The turn store and its read-out for one LM block.

    ``read(x [n_tok, D], layout, state) -> (m [n_tok, D], state)``: every audio token of a batch of
    utterances laid out in memory streams (:class:`StreamLayout`, ``chunk_size="utterance"``, N_p = 0:
    utterance j of stream s is slot j) reads its stream's store of earlier turns. ``state``: the
    streams' stores from earlier calls, ``(entries [S, N, D], valid [S, N] bool)``, or ``None`` (empty);
    returned with this call's turns appended. ``inject(h, m)``: MAL's gated residual."""

    def __init__(self, hidden_size: int, c: RetrievalConfig, max_tokens: int):
        super().__init__()
        self.max_tokens, self.top_k, self.d_m = max_tokens, c.top_k, c.d_m
        self.W_q = nn.Linear(hidden_size, c.d_m, bias=False)
        self.W_k = nn.Linear(hidden_size, c.d_m, bias=False)
        self.W_v = nn.Linear(hidden_size, c.d_m, bias=False)
        self.W_out = nn.Linear(c.d_m, hidden_size, bias=False)
        self.alpha = nn.Parameter(torch.zeros(()))  # tanh(0) = 0

    def gate_parameters(self):
        return [self.alpha]

    def read(self, x: torch.Tensor, layout: StreamLayout, state=None):
        x_dtype, x = x.dtype, x.to(self.W_q.weight.dtype)  # the branch in float32 over a bf16 host
        S, Ls, C = layout.n_streams, layout.length, layout.chunk
        J = Ls // C
        stream = torch.div(layout.tok_dst, Ls, rounding_mode="floor")             # [n_tok]
        slot = torch.div(layout.tok_dst % Ls, C, rounding_mode="floor")           # [n_tok] turn in its stream
        flat = stream * J + slot
        count = torch.bincount(flat, minlength=S * J).to(x.dtype)                 # tokens per (stream, turn)
        e = x.new_zeros(S * J, x.shape[1]).index_add(0, flat, x)                  # e_j = mean_t h_{j,t}
        e = (e / count.clamp(min=1)[:, None]).view(S, J, -1)
        cur_valid = (count > 0).view(S, J)
        if state is None:
            prev, prev_valid = x.new_zeros(S, 0, x.shape[1]), cur_valid.new_zeros(S, 0)
        else:
            prev, prev_valid = state
            prev = prev.to(x.dtype)
        entries = torch.cat([prev, e], 1)                                         # [S, N, D]
        valid = torch.cat([prev_valid, cur_valid], 1)                             # [S, N]
        n_prev = prev.shape[1]
        k, v = self.W_k(entries), self.W_v(entries)                               # [S, N, d_m]
        q = self.W_q(x)                                                           # [n_tok, d_m]
        scores = torch.einsum("td,tnd->tn", q, k[stream]) / math.sqrt(self.d_m)   # [n_tok, N]
        idx = torch.arange(entries.shape[1], device=x.device)
        allowed = valid[stream] & ((idx[None] < n_prev) | (idx[None] < n_prev + slot[:, None]))  # turns < i
        scores = scores.masked_fill(~allowed, -math.inf)
        if self.top_k and self.top_k < scores.shape[1]:
            kth = scores.topk(self.top_k, dim=1).values[:, -1:]                  # the k-th best score
            scores = scores.masked_fill(scores < kth, -math.inf)
        any_entry = allowed.any(1, keepdim=True)
        a = torch.softmax(scores.masked_fill(~any_entry, 0.0), dim=1) * any_entry  # no earlier turn: r = 0
        r = torch.einsum("tn,tnd->td", a, v[stream])                              # [n_tok, d_m]
        return self.W_out(r).to(x_dtype), (entries, valid)

    def inject(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        return h + torch.tanh(self.alpha).to(m.dtype).expand(*m.shape[:-1], 1) * m


class TurnRetrieval(TitansMemoryMethod):
    """Attention over the pooled hidden states of the dialogue's earlier turns, MAL's gated residual."""

    name = "retrieval"
    config_cls = RetrievalConfig
    branch_cls = RetrievalBranch
    variant_options = ("speaker_memory",)
    presets = phase1_presets({
        "smoke": dict(d_m=16, epochs=1, lr=3e-3, gate_lr=1e-2, batch_dialogues=8),
        # mal's CPU-sized values (same width, steps, streams): retrieval and mal differ in the memory alone
        "default": dict(d_m=16, epochs=3, lr=3e-3, gate_lr=5e-2, batch_dialogues=8, speaker_memory=True),
    })

    @classmethod
    def variant(cls, config: RetrievalConfig) -> str:
        """``speaker`` with one store per speaker of the dialogue (``retrieval[speaker]``)."""
        return "speaker" if config.speaker_memory else ""

    @classmethod
    def search_space(cls, trial):
        """Phase 1's LoRA, then the store's read: width d_m, top-k, placement, Phase 2's epochs and
        learning rates."""
        return {**two_stage_search_space(trial),
                "d_m": trial.suggest_categorical("d_m", [16, 32, 64, 128]),
                "top_k": trial.suggest_categorical("top_k", [0, 1, 4]),
                "layers": trial.suggest_categorical("layers", ["all", "quartile", "0"])}

    def _layout_options(self):
        return 0, "utterance"

    def mean_gate(self) -> float:
        """Mean |tanh(alpha_l)| over branches."""
        return float(np.mean([abs(math.tanh(b.alpha.item())) for b in self.branches.values()]))
