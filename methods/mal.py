"""``mal``: Memory-as-a-Layer (Titans-as-a-Layer, Sec. 3.3, Eq. 6-10; schedule Sec. 3.4).

For each chosen LM block l and utterance x_i, with h_{i,l} ``[T_i, D]`` the residual-stream hidden
states at the audio-token positions before block l:

    z_{i,l} = [P_l ; W_in^(l) h_{i,l}]                      (Eq. 6)   z: [N_p + T_i, d_m]
    (r_{i,l}, S_i^(l)) = M_l(z_{i,l}; S_{i-1}^(l))           (Eq. 7)   titans-pytorch NeuralMemory
    delta_{i,l} = W_out^(l) r_{i,l}[N_p:]                    (Eq. 8)   delta: [T_i, D]
    h~_{i,l} = h_{i,l} + tanh(alpha_l) delta_{i,l}           (Eq. 9)   alpha_l initialised to 0

The state S^(l) is carried across the dialogue's utterances and reset (``None``) at its start; no
token is added, removed or moved. With every alpha_l = 0 the host's outputs are bit-identical.
Trainable (Eq. 10): {W_in, W_out, M, alpha, P} per branch; backbone and the (phase-1) LoRA frozen;
the gates {alpha} get their own learning rate and clipping (2e-4, 2.0). Default placement: every
block (the paper's main setting); ``layers="0"`` is the single-branch placement of the injection
ablation against ``mac`` and ``mag``. The shared machinery (memory updates, state, schedule) is in
:mod:`benchbench.methods.titans_memory`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from benchbench.methods.titans_memory import (MemoryBranch, TitansMemoryConfig, TitansMemoryMethod,
                                              resolve_layers)

MALConfig = TitansMemoryConfig

__all__ = ["MALBranch", "MALConfig", "MemoryAsALayer", "resolve_layers"]


class MALBranch(MemoryBranch):
    """One MAL branch for one LM block (Eq. 6-9). ``forward(h [B, T, D], state) -> (h~ [B, T, D], state)``."""

    def __init__(self, hidden_size: int, c: TitansMemoryConfig, max_tokens: int):
        super().__init__(hidden_size, c, max_tokens)
        self.alpha = nn.Parameter(torch.zeros(()))  # tanh(0) = 0: the untrained branch is the identity

    def gate_parameters(self):
        return [self.alpha]

    def inject(self, h: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        # tanh(alpha) as a [n_tok, 1] column: alpha's gradient is then summed per token, then over the
        # tokens, in an order that does not depend on torch's thread count (a scalar broadcast over
        # [n_tok, D] is one parallel reduction, split by thread: Ray's 1-thread workers and a 2-thread
        # local run trained apart)
        return h + torch.tanh(self.alpha).to(delta.dtype).expand(*delta.shape[:-1], 1) * delta  # Eq. 9


class MemoryAsALayer(TitansMemoryMethod):
    """Titans memory branches added to the audio-token hidden states of LM blocks (Eq. 9)."""

    name = "mal"
    branch_cls = MALBranch

    def mean_gate(self) -> float:
        """Mean |tanh(alpha_l)| over branches."""
        return float(np.mean([abs(math.tanh(b.alpha.item())) for b in self.branches.values()]))
