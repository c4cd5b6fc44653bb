"""``rmt``: recurrent memory tokens (Bulatov et al., 2022, "Recurrent Memory Transformer", Sec. 3), the
host LM reading and writing its own memory across a dialogue's turns.

For utterance i of a memory stream (the dialogue, or one speaker of it) with audio-token embeddings
``[T_i, D]`` and the stream's memory H^mem_i ``[M, D]`` (H^mem_0: M learned embeddings), the LM input
is the prompt with the audio span replaced by

    [ H^mem_i ; audio_i ; H^mem_i ]                                        (RMT Eq. 1, decoder form)

the read copy before the audio tokens, the write copy after them (in a causal LM only positions after
the audio can carry it; RMT's decoder-only form puts the write tokens at the segment's end). The LM's
final hidden states at the write positions become the next utterance's memory,

    H^mem_{i+1} = H~^write_i = LM(...)[write positions]                    (RMT Eq. 2-3)

and the label is read at the answer position as for every method. No block is changed: the frozen host
(with the Phase-1 LoRA) does the reading and the writing. The memory is reset to H^mem_0 at the
dialogue's start. Phase 2 trains H^mem_0 alone by backpropagation through time over the dialogue (the
gradient flows through every memory transition; ``bptt`` turns truncates it, RMT's BPTT unroll), with
the task LoRA and backbone frozen. Phase 1 is ``lora``, replayed; dev may keep it.

Positions: the 2M tokens are inserted before the LM runs, so every later token's position moves by M
or 2M (RMT's memory takes positions like any token; no rotary correction). A turn costs one LM forward
of L + 2M tokens, and a dialogue's turns are sequential (turn i needs turn i-1's output): a stream
batch runs one forward per turn position, across all the streams of its dialogues.

Departures from RMT (labelled in docs/fidelity.md): RMT fine-tunes the whole model with the memory,
here the host is frozen in Phase 2 (the suite's shared schedule: only the memory trains), so the
written states are the host's own final-layer states, never taught to be memory; RMT's segments are
fixed-length token windows, ours the dialogue's utterances (Eq. 1 of Titans-as-a-Layer).
``recurrent-memory-transformer-pytorch`` builds and trains a model of its own, so it cannot wrap a
pretrained host; the insertion is written here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from benchbench.backbone import Segment
from benchbench.data import UtteranceInput
from benchbench.method import ContextMethod, check_ranges
from benchbench.methods.titans_memory import TitansMemoryMethod, TwoStageMemoryConfig
from benchbench.training import attach_lora, auxiliary_rng, lora_search_space, phase1_presets


@dataclass
class RMTConfig(TwoStageMemoryConfig):
    """``rmt``'s config: the shared two-stage schedule plus the memory size and BPTT unroll."""

    n_mem: int = 10   # M memory tokens (ours; RMT studies sizes from 1 up)
    bptt: int = 0     # turns the gradient flows back through the memory in Phase 2; 0: the whole dialogue

    def check(self) -> None:
        super().check()
        check_ranges(self, at_least=dict(n_mem=1, bptt=0))


class MemoryTokens(nn.Module):
    """H^mem_0 ``[M, D]``: the memory of a stream's first utterance (learned; scaled like the LM's
    token embeddings, ``std``)."""

    def __init__(self, n_mem: int, hidden_size: int, std: float):
        super().__init__()
        self.initial = nn.Parameter(torch.randn(n_mem, hidden_size) * std)

    def gate_parameters(self) -> list[nn.Parameter]:
        return []


class RecurrentMemory(TitansMemoryMethod):
    """Memory tokens read before and written after each utterance's audio tokens, carried by the host."""

    name = "rmt"
    config_cls = RMTConfig
    variant_options = ("speaker_memory",)
    presets = phase1_presets({
        "smoke": dict(n_mem=2, epochs=1, lr=3e-3, batch_dialogues=8),
        # mal's CPU-sized steps and streams, so rmt and mal differ in the memory alone
        "default": dict(n_mem=4, epochs=3, lr=3e-3, batch_dialogues=8, speaker_memory=True),
    })

    @classmethod
    def variant(cls, config: RMTConfig) -> str:
        """``speaker`` with one memory per speaker of the dialogue (``rmt[speaker]``)."""
        return "speaker" if config.speaker_memory else ""

    @classmethod
    def search_space(cls, trial):
        """Phase 1's LoRA, then the memory: M, the BPTT unroll, Phase 2's epochs and learning rate."""
        return {"lora": lora_search_space(trial), "epochs": trial.suggest_int("epochs", 1, 10),
                "lr": trial.suggest_float("lr", 1e-4, 1e-2, log=True),
                "n_mem": trial.suggest_categorical("n_mem", [1, 2, 4, 8, 16]),
                "bptt": trial.suggest_categorical("bptt", [0, 2, 4])}

    def __init__(self, backbone, labels, config=None, seed=0):
        ContextMethod.__init__(self, backbone, labels, config, seed)
        self.lora_params = attach_lora(self.lm, self.config.lora)
        emb = self.lm.language_model.get_base_model().embed_tokens.weight
        with auxiliary_rng(seed):  # Phase 1 stays bit-identical to lora's (the memory's draws apart)
            self.branches = nn.ModuleDict({"memory": MemoryTokens(self.config.n_mem, self.lm.hidden_size,
                                                                  float(emb.detach().float().std()))})
        self.branches.to(self.lm.lm_head.weight.device)
        self._memory_removed = False
        self._active = None
        self.reset()

    # ------------------------------------------------------------------ one turn (RMT Eq. 1-3)
    def _forward_memory(self, embeddings: Sequence[torch.Tensor], memory: Sequence[torch.Tensor]):
        """One LM forward over B utterances (audio embeddings ``[T_b, D]``), each with its stream's memory
        ``[M, D]`` read before and written after its audio tokens. Returns ``(logits [B, C], the next
        memories [B, M, D])``."""
        batch = self.lm.batch([[Segment(e)] for e in embeddings])
        h, mask = batch.inputs_embeds, batch.attention_mask
        B, L, D = h.shape
        M = self.config.n_mem
        dev = h.device
        start = torch.tensor([sp[-1][0] for sp in batch.audio_spans], device=dev)
        end = torch.tensor([sp[-1][1] for sp in batch.audio_spans], device=dev)
        pos = torch.arange(L, device=dev)[None].expand(B, L)
        dst = pos + M * (pos >= start[:, None]) + M * (pos >= end[:, None])   # where the old tokens go
        rows = torch.arange(B, device=dev)[:, None]
        mem = torch.stack(list(memory)).to(h.dtype)                            # [B, M, D]
        read = start[:, None] + torch.arange(M, device=dev)[None]              # [B, M]
        write = end[:, None] + M + torch.arange(M, device=dev)[None]           # after the shifted audio
        x = h.new_zeros(B, L + 2 * M, D).index_put((rows.expand(B, L), dst), h)
        x = x.index_put((rows.expand(B, M), read), mem).index_put((rows.expand(B, M), write), mem)
        m2 = mask.new_zeros(B, L + 2 * M).index_put((rows.expand(B, L), dst), mask)
        m2 = m2.index_put((rows.expand(B, M), read), mask.new_ones(B, M)).index_put((rows.expand(B, M), write),
                                                                                    mask.new_ones(B, M))
        out = self.lm.hidden_states(x, m2)                                     # [B, L + 2M, D]
        logits = self.lm.label_logits(out, batch.answer_index + 2 * M)
        return logits, out[rows, write]                                        # H^mem_{i+1}: [B, M, D]

    def _initial(self) -> torch.Tensor:
        return self.branches["memory"].initial

    def _forward_dialogues(self, dialogues: Sequence[Sequence[UtteranceInput]]) -> torch.Tensor:
        """Label logits ``[sum N_d, C]`` of whole dialogues from fresh memories: turn position by turn
        position, every memory stream of every dialogue in one forward; in training the gradient flows
        back through ``bptt`` memory transitions (all with 0)."""
        embs = [self.audio_embeddings(u) for utts in dialogues for u in utts]
        streams = self._dialogue_streams(dialogues)
        logits: list[torch.Tensor | None] = [None] * len(embs)
        memory: list[torch.Tensor] = [self._initial()] * len(streams)
        for t in range(max(len(s) for s in streams)):
            active = [k for k, s in enumerate(streams) if len(s) > t]
            out, new = self._forward_memory([embs[streams[k][t]] for k in active], [memory[k] for k in active])
            for j, k in enumerate(active):
                logits[streams[k][t]] = out[j]
                cut = self.config.bptt and (t + 1) % self.config.bptt == 0
                memory[k] = new[j].detach() if cut else new[j]
        return torch.stack(logits)

    @torch.no_grad()
    def step(self, utterance: UtteranceInput) -> np.ndarray:
        if self._memory_removed:
            return super().step(utterance)
        self.lm.eval()
        stream = self._step_stream(utterance)
        memory = self.states.get(stream, self._initial())
        logits, new = self._forward_memory([self.audio_embeddings(utterance)], [memory])
        self.states[stream] = new[0]
        return torch.softmax(logits.float(), -1).numpy()[0]
