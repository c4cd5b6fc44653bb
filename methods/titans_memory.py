"""Titans memory branches inside a frozen audio LLM: the shared machinery of ``mal``, ``mac`` and ``mag``.

Titans-as-a-Layer (Sec. 3.2-3.4) compares three ways of putting the same Titans NeuralMemory branch
into a frozen, LoRA-tuned LALM. With h ``[T, D]`` the audio-token hidden states of the current
utterance in the residual stream before an LM block, P the persistent tokens and M the memory:

    m = W_out M([P; W_in h])[N_p:]            (Eq. 3, Eq. 6-8)        m: [T, D]
    MAC:  H = [W_out P; m; h]                 (Eq. 4)  sequence grows by N_p + T, positions shift
    MAG:  H = h * sigmoid(W_g m)              (Eq. 5)  sequence length unchanged
    MAL:  H = h + tanh(alpha) m               (Eq. 9)  alpha = 0 at init: the host is untouched

Everything except the injection is shared, so ``mac`` / ``mag`` / ``mal`` differ in that alone: the
branch (:class:`MemoryBranch`: W_in, P, the titans-pytorch NeuralMemory, W_out), the memory-update
schedule (``chunk_size``), the per-dialogue state (carried across the dialogue's utterances, reset at
its start), the placement (``layers``: every block, the quartile blocks, or a list) and the two-stage
training schedule of Sec. 3.4 (Phase 1: the task LoRA with the memory removed, exactly ``lora``;
Phase 2: LoRA and backbone frozen, the branches trained by backpropagation through each training
dialogue, with separate learning rates and clipping for the branch {W_in, W_out, M, P} and for its
gates).

Memory streams: one state per dialogue (the paper; the ``paper`` preset) or, with ``speaker_memory``
(the CPU-sized ``default`` preset), one per speaker of the dialogue, chosen by the utterance's
``speaker`` metadata; both are reset at the dialogue's start.

Our reading where the paper is silent: in MAC, P enters the host sequence through the same W_out
(P lives in the memory's d_m space, as in MAL); MAC has no gate; MAG's W_g starts at zero weight and a
bias ``gate_bias_init`` (sigmoid(3) = 0.95), so an untrained MAG nearly passes h through.

The surprise (``surprise``): Titans' update rule takes step t's surprise gradient at M_{t-1} (in its
mini-batch form, at the start of each mini-batch). ``"sequential"`` (the dataclass default and the
``paper`` preset) makes every chunk (one utterance) a titans-pytorch mini-batch (``ttt_batch_size``),
so the memory's weights move after each utterance and the next one's gradient is taken at them;
each call's positions restart at 0 so the mini-batches fall on its own chunk boundaries, and
:class:`_ChunkMean` reduces one mini-batch's chunks at a time. Along a dialogue this is sequential by
definition (one store call per utterance); across dialogues it stays batched. ``"initial"``
(titans-pytorch's ``NeuralMemory`` without ``batch_size``, the ``default`` preset's, chosen by the
measurement in ``results/forms-synthetic`` and ``results/forms-emodb``) takes every gradient at the initial weights M_0; only the momentum and decay
accumulation carries (labelled ``[m0-surprise]``). Both forms stream and batch identically (the kit).

Memory updates (``chunk_size``):

* ``"utterance"`` (default): one memory update per utterance, and every token of utterance i reads
  the memory as it was after utterance i-1, i.e. exactly Eq. 1 (y_i = f(x_i, S_{i-1}),
  S_i = U(S_{i-1}, x_i)). Each call stores one titans-pytorch chunk of ``N_p + T_max + 1`` tokens
  (T_max: the backbone's audio tokens per encoder window): z padded with zeros, padding excluded from
  the surprise gradients by ``store_mask`` (its learning rate is 0). The padding still enters the
  mean-pooled chunk summary from which the decay and momentum gates are computed, so those gates
  depend on the utterance's length (a deterministic function of the utterance alone). The last slot
  is always padding: titans-pytorch lets the chunk's last retrieval position read the updated memory.
* an integer: titans-pytorch's own chunking inside the utterance (later tokens read memory that
  already holds the utterance's earlier tokens). titans-pytorch 0.5.5 chains state exactly only when
  every call's length is a multiple of ``chunk_size`` (see ../shared/reference/titans-pytorch.md);
  :class:`MemoryBranch` refuses other lengths with a clear error instead of silently computing
  something else. ``chunk_size=1`` chains exactly for any length (one update per token: slow).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator, Sequence

import numpy as np
import torch
from titans_pytorch import NeuralMemory
from torch import nn

from benchbench.backbone import LMBatch, Segment
from benchbench.data import UNSCORED, UtteranceInput
from benchbench.method import (ConfigValueError, ContextMethod, FitReport, MethodConfig, UtteranceLevelMethod,
                               check_ranges, utterance_groups)
from benchbench.metrics import METRICS
from benchbench.training import (BestCheckpoint, LoRASettings, attach_lora, auxiliary_rng, dev_epoch_score,
                                 fit_task_lora, phase1_presets, run_epochs, two_stage_search_space)


SURPRISES = ("sequential", "initial")
"""Where Titans' surprise gradient is taken (:attr:`TitansMemoryConfig.surprise`): the paper's rule, then
titans-pytorch's form without ``batch_size``."""


@dataclass
class TwoStageMemoryConfig(MethodConfig):
    """What every memory on the shared two-stage schedule has (``mal``, ``mac``, ``mag``, ``ttt``,
    ``rmt``, ``retrieval``): Phase 1's LoRA and form, Phase 2's optimisation (Titans-as-a-Layer
    Sec. 3.4) and the memory streams. The memory's own options are in the subclasses."""

    lora: LoRASettings = field(default_factory=LoRASettings)  # Phase 1 (Sec. 3.4)
    epochs: int = 2              # Phase 2: two epochs
    lr: float = 1e-4             # the memory's parameters ({W_in, W_out, M, P} in MAL): lr 1e-4 ...
    grad_clip: float = 1.0       # ... clipping 1.0
    batch_dialogues: int = 1     # dialogues per Phase-2 step
    eval_batch_utterances: int = 256  # utterances (of whole dialogues) per LM forward when predicting
    selection_metric: str = "ua"
    # One memory state per speaker of the dialogue instead of one per dialogue: each utterance reads
    # and writes only its speaker's state (a speaker-baseline variant; the paper keeps one state).
    speaker_memory: bool = False
    # Phase 1: "lora" (Sec. 3.4: the task LoRA first, replayed from the lora cell), or "none": the memory
    # trains on the frozen host without any LoRA, the setting of the injection ablation (Sec. 3.2:
    # "a single memory branch" in "a frozen LALM"; bench run --methods zero_shot,mac,mag,mal
    # --set mal.layers=0 --set mac.phase1=none --set mag.phase1=none --set mal.phase1=none)
    phase1: str = "lora"
    # The phase gate (neither paper has it): keep Phase 2 only where its dev-best epoch beats Phase 1 on
    # dev, else predict with Phase 1 (the memory off). Off: the papers' protocol (train the memory for
    # its epochs, report it); the harness predicts the test set under both phases either way, so the
    # gated result is published beside it (docs/statistics.md, "The phase gate")
    phase_gate: bool = False
    # False: the capacity control. The memory is reset before every utterance, in Phase-2 training and
    # in evaluation (one memory stream per utterance; same parameters, batches, epochs): whatever it
    # gains over lora is capacity on the current utterance, none of it the dialogue
    history: bool = True

    def check(self) -> None:
        check_ranges(self, at_least=dict(epochs=0, batch_dialogues=1, eval_batch_utterances=1),
                     positive=("lr", "grad_clip"), choices=dict(selection_metric=METRICS, phase1=("lora", "none")))


@dataclass
class BranchMemoryConfig(TwoStageMemoryConfig):
    """A memory branch hooked into LM blocks (``mal``, ``mac``, ``mag``, ``ttt``, ``retrieval``): its
    placement, width and gates (Titans-as-a-Layer Sec. 3.3-3.4)."""

    layers: str = "all"          # "all" (paper), "quartile" (4 layers at the quartiles), or "0,3,5"
    d_m: int = 128               # memory dimension d_m (paper, every-layer placement)
    gate_lr: float = 2e-4        # gates ({alpha} in MAL, W_g in MAG; MAC has none): lr 2e-4 ...
    gate_grad_clip: float = 2.0  # ... clipping 2.0

    def check(self) -> None:
        super().check()
        check_ranges(self, at_least=dict(d_m=1), positive=("gate_lr", "gate_grad_clip"))
        if self.layers not in ("all", "quartile"):
            try:
                [int(x) for x in str(self.layers).split(",")]
            except ValueError:
                raise ConfigValueError("layers", self.layers, "expected all, quartile or comma-separated block "
                                       "indices") from None


@dataclass
class TitansMemoryConfig(BranchMemoryConfig):
    """Config shared by ``mal``, ``mac`` and ``mag`` (paper defaults: Titans-as-a-Layer Sec. 3.3-3.4)."""

    n_persistent: int = 8        # N_p persistent tokens P_l
    chunk_size: int | str = "utterance"  # "utterance": one update per utterance (Eq. 1); or tokens per update
    memory_depth: int = 2        # depth-2 MLP memory (Fig. 1)
    memory_heads: int = 1
    memory_max_lr: float = 0.1   # NeuralMemory default_step_transform_max_lr (1.0 can diverge)
    memory_max_grad_norm: float = 1.0  # surprise-gradient clipping inside the memory
    # Where each utterance's surprise gradient (Titans' update rule, Behrouz et al. 2024, Eq. 8-14) is
    # taken: "sequential" (Titans: step t's gradient at M_{t-1}; one utterance, one mini-batch: the
    # memory's weights move after every utterance, titans-pytorch's ttt_batch_size) or "initial"
    # (titans-pytorch's NeuralMemory without batch_size: every gradient at the initial weights M_0,
    # only the momentum and decay accumulation carries across utterances; labelled [m0-surprise])
    surprise: str = "sequential"

    def check(self) -> None:
        super().check()
        check_ranges(self, at_least=dict(n_persistent=0, memory_depth=1, memory_heads=1),
                     positive=("memory_max_lr", "memory_max_grad_norm"), choices=dict(surprise=SURPRISES))
        if self.memory_heads > 1:
            # titans-pytorch 0.5.5, issue #64 (open): with heads > 1 the per-head memory parameters share
            # storage, so the first optimizer step or weight restore raises (seen here on both surprise forms)
            raise ConfigValueError("memory_heads", self.memory_heads, "titans-pytorch 0.5.5 cannot train more than "
                                   "one memory head (upstream issue #64: the heads' parameters share storage); "
                                   "use memory_heads=1, as every preset does")
        if self.chunk_size != "utterance" and not (isinstance(self.chunk_size, int) and self.chunk_size >= 1):
            raise ConfigValueError("chunk_size", self.chunk_size, "expected utterance or a positive integer")


def resolve_layers(spec: str, n_layers: int) -> list[int]:
    """Block indices for a placement spec. ``quartile`` maps the paper's {7, 15, 23, 31} of a
    32-block LM proportionally: ``round((q + 1) * n / 4) - 1`` for q = 0..3 (deduplicated).
    ``ValueError`` for an unknown spec or an index outside ``[0, n_layers)``."""
    if spec == "all":
        return list(range(n_layers))
    if spec == "quartile":
        return sorted({max(0, round((q + 1) * n_layers / 4) - 1) for q in range(4)})
    try:
        idx = sorted({int(x) for x in str(spec).split(",")})
    except ValueError:
        raise ValueError(f"memory layers {spec!r}: expected 'all', 'quartile' or comma-separated ints") from None
    bad = [i for i in idx if not 0 <= i < n_layers]
    if bad:
        raise ValueError(f"memory layers {bad} out of range for a {n_layers}-block language model")
    return idx


@dataclass
class StreamLayout:
    """Where the audio tokens of a batch of utterances go in the memory's input, per memory stream.

    A batch item is one utterance (its audio tokens at ``[start_b, end_b)`` of the residual stream
    ``[B, L, D]``); a memory stream is a dialogue (or one speaker of it) with its utterances in turn
    order. Stream s's memory input is ``[L_s, d_m]``: utterance j of the stream occupies a slot that
    starts with the N_p persistent tokens P and continues with its T_b tokens W_in h. With
    ``chunk_size="utterance"`` slot j is chunk j of ``C = max_b(N_p + T_b) + 1`` positions (padding
    after the tokens, excluded from the surprise by the store mask and from the chunk means by
    ``counts``), so one titans-pytorch call stores and reads the whole dialogue exactly as streaming
    it utterance by utterance would; with an integer ``chunk_size`` the slots are packed back to back
    (every N_p + T_b must then be a multiple of it), as the chained calls would see them.

    A stream with fewer utterances than the longest of its call is filled up to the same length with
    copies of its last chunk: an all-padding chunk would have zero surprise, which titans-pytorch
    0.5.5's ``softclamp_grad_norm`` turns into NaN (0 * 0.5 / 0), and the NaN would reach the
    gradients through the backward pass. The copies come after the stream's end: nothing reads them.

    Attributes:
        b_idx, pos_idx: ``[n_tok]`` item and position in ``[B, L, D]`` of every audio token.
        tok_dst: ``[n_tok]`` flat index in ``[S * L_s]`` of every audio token's W_in h.
        src: ``[S * L_s]`` what each memory-input position holds: row ``i < N_p`` of P, row
            ``N_p + k`` for audio token k's W_in h, or ``N_p + n_tok`` for zero padding.
        mask: ``[S, L_s]`` bool, real positions (stored with their learning rate) vs padding.
        counts: ``[S, L_s / C]`` real positions per chunk (the divisor of the chunk means).
        n_streams, length, chunk: S, L_s and the titans-pytorch chunk size C of this call.
    """

    b_idx: torch.Tensor
    pos_idx: torch.Tensor
    tok_dst: torch.Tensor
    src: torch.Tensor
    mask: torch.Tensor
    counts: torch.Tensor
    n_streams: int
    length: int
    chunk: int

    @classmethod
    def build(cls, spans: Sequence[tuple[int, int]], streams: Sequence[Sequence[int]], n_p: int,
              chunk_size: int | str, max_tokens: int | None = None, device=None) -> "StreamLayout":
        """Layout for items with audio spans ``spans[b] = (start, end)`` grouped into ``streams`` (lists
        of item indices in turn order; every item in exactly one stream).

        Raises:
            ValueError: an utterance longer than ``max_tokens`` (the backbone's window), or, for an
                integer ``chunk_size``, N_p + T not a multiple of it (titans-pytorch 0.5.5 would not
                chain the state exactly: ../shared/reference/titans-pytorch.md, pitfall 1).
        """
        lengths = [e - s for s, e in spans]
        if max_tokens is not None and max(lengths, default=0) > max_tokens:
            raise ValueError(f"memory branch: utterance of {max(lengths)} audio tokens is longer than the "
                             f"{max_tokens} the backbone's window holds")
        if chunk_size == "utterance":
            C = max(n_p + t for t in lengths) + 1
            offsets = [[j * C for j in range(len(st))] for st in streams]
            ends = [len(st) * C for st in streams]
        else:
            C = int(chunk_size)
            bad = [n_p + t for t in lengths if (n_p + t) % C]
            if bad:
                raise ValueError(f"memory branch: N_p + T = {bad[0]} is not a multiple of chunk_size {C}; "
                                 "titans-pytorch would not chain the dialogue state exactly (use chunk_size=1 "
                                 "or a divisor of N_p + T)")
            offsets, ends = [], []
            for st in streams:
                o = np.cumsum([0] + [n_p + lengths[b] for b in st])
                offsets.append(o[:-1].tolist())
                ends.append(int(o[-1]))
        Ls = max(-(-max(ends) // C) * C, C)
        n_tok = sum(lengths[b] for st in streams for b in st)
        src = np.full(len(streams) * Ls, n_p + n_tok)
        mask = np.zeros(len(streams) * Ls, dtype=bool)
        b_idx, pos_idx, tok_dst = [], [], []
        k = 0
        for s_i, st in enumerate(streams):
            for b, off in zip(st, offsets[s_i]):
                base = s_i * Ls + off
                start, end = spans[b]
                T = end - start
                src[base:base + n_p] = np.arange(n_p)
                src[base + n_p:base + n_p + T] = n_p + k + np.arange(T)
                tok_dst.append(base + n_p + np.arange(T))
                b_idx.append(np.full(T, b))
                pos_idx.append(start + np.arange(T))
                mask[base:base + n_p + T] = True
                k += T
            last = slice(s_i * Ls + ends[s_i] - C, s_i * Ls + ends[s_i])
            for pad in range(s_i * Ls + ends[s_i], (s_i + 1) * Ls, C):  # copies of the last chunk
                src[pad:pad + C], mask[pad:pad + C] = src[last], mask[last]
        cat = lambda xs: torch.as_tensor(np.concatenate(xs) if xs else np.zeros(0), dtype=torch.long, device=device)
        mask_t = torch.as_tensor(mask, device=device).view(len(streams), Ls)
        return cls(cat(b_idx), cat(pos_idx), cat(tok_dst), torch.as_tensor(src, device=device), mask_t,
                   mask_t.view(len(streams), Ls // C, C).sum(-1).float(), len(streams), Ls, C)

    def shift(self, n: torch.Tensor) -> None:
        """Item b's tokens moved ``n[b]`` positions right (MAC inserted tokens before them)."""
        self.pos_idx = self.pos_idx + n[self.b_idx]


@dataclass
class MemoryPass:
    """One LM forward with the memory on: what the block hooks read and update.

    Attributes:
        states: layer key -> titans-pytorch ``NeuralMemState`` of the S memory streams of this forward
            (batched over streams): ``S_{i-1}`` before the forward, the stream's last state after it (a
            missing key is ``S_0``, a fresh memory).
        batch: the :class:`LMBatch` being run (one utterance per item).
        layout: where each item's audio tokens sit in the residual stream and in the memory input.
        block_kwargs: keyword overrides for every later block (MAC: the lengthened sequence's
            ``position_ids``, ``position_embeddings`` and attention mask).
    """

    states: dict[str, Any]
    batch: LMBatch | None = None
    layout: StreamLayout | None = None
    block_kwargs: dict = field(default_factory=dict)

    def start(self, batch: LMBatch, layout: StreamLayout) -> None:
        """A new forward over ``batch`` laid out by ``layout``."""
        self.batch, self.layout, self.block_kwargs = batch, layout, {}

    def insert_tokens(self, n: torch.Tensor, block_kwargs: dict) -> None:
        """``n[b]`` tokens were inserted right before item b's audio tokens (MAC, Eq. 4): its tokens and
        its answer position move by ``n[b]`` (``EmotionLM.forward`` reads the answer after the LM has
        run) and every later block gets ``block_kwargs``."""
        self.layout.shift(n)
        self.batch.answer_index = self.batch.answer_index + n
        self.block_kwargs = block_kwargs


class _ChunkMean(nn.Module):
    """Replaces titans-pytorch's ``AveragePool`` chunk summary (from which the decay and momentum gates
    are computed): the mean over each chunk's real positions, ``counts`` set by the caller before each
    call, instead of over all C positions (padding included). ``[b, n * C, d] -> [b, n, d]``."""

    def __init__(self):
        super().__init__()
        self.counts: torch.Tensor | None = None
        self.offset = 0  # chunks of ``counts`` consumed: a call split into mini-batches (sequential
        # surprise) reduces one mini-batch at a time, in order

    def set_counts(self, counts: torch.Tensor | None) -> None:
        """The real positions per chunk ``[b, n]`` of the next NeuralMemory call (``None``: plain means)."""
        self.counts, self.offset = counts, 0

    def forward(self, x: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        b, L, d = x.shape
        n = L // chunk_size
        total = x.reshape(b, n, chunk_size, d).sum(2)
        if self.counts is None or self.counts.shape[0] != b or self.offset + n > self.counts.shape[1]:
            return total / chunk_size  # a call not from MemoryBranch.read
        counts = self.counts[:, self.offset:self.offset + n]
        self.offset += n
        return total / counts.to(total).clamp(min=1)[..., None]


class MemoryBranch(nn.Module):
    """The Titans memory read-out shared by MAL, MAC and MAG (Eq. 3 / Eq. 6-8).

    ``read(x [n_tok, D], layout, state) -> (m [n_tok, D], state)`` for the audio tokens of a batch of
    utterances in memory streams (:class:`StreamLayout`); ``retrieve(h [B, T, D], state)`` is the
    same for B equal-length utterances, each its own stream. Subclasses add the injection
    (``inject(x, m)``; ``forward(h, state)`` applies it to ``h``). ``max_tokens``: the most audio
    tokens one utterance can have (the backbone's window). ``ValueError`` (from
    :meth:`StreamLayout.build`) for lengths it cannot chain exactly.

    Chunk statistics: the decay and momentum gates of an update come from the mean of its chunk's
    stored positions (N_p + T, see :class:`_ChunkMean`), whatever the padding, so an utterance's
    update does not depend on the lengths of the other utterances it is batched with. (Until
    results version 2 every update was padded to N_p + T_max + 1 positions and the gates read the
    mean over the padding too.)
    """

    def __init__(self, hidden_size: int, c: TitansMemoryConfig, max_tokens: int):
        super().__init__()
        self.n_p, self.max_tokens, self.chunk_size, self.surprise = c.n_persistent, max_tokens, c.chunk_size, \
            c.surprise
        self.W_in = nn.Linear(hidden_size, c.d_m, bias=False)
        self.W_out = nn.Linear(c.d_m, hidden_size, bias=False)
        self.P = nn.Parameter(torch.randn(c.n_persistent, c.d_m) * 0.02)
        # chunk_size here is a placeholder: every call sets the chunk of its layout (_set_chunk)
        self.memory = NeuralMemory(
            dim=c.d_m, chunk_size=1 if c.chunk_size == "utterance" else c.chunk_size, heads=c.memory_heads,
            default_model_kwargs=dict(depth=c.memory_depth, expansion_factor=4.0),
            default_step_transform_max_lr=c.memory_max_lr, max_grad_norm=c.memory_max_grad_norm)
        self.memory.reduce_to_chunk_rep = _ChunkMean()

    def gate_parameters(self) -> list[nn.Parameter]:
        """Parameters trained with the gate learning rate and clipping (Sec. 3.4)."""
        return []

    def layout(self, lengths: Sequence[int], device=None) -> StreamLayout:
        """The layout of B utterances of ``lengths`` tokens, each its own stream, spans ``(0, T_b)``."""
        return StreamLayout.build([(0, t) for t in lengths], [[b] for b in range(len(lengths))], self.n_p,
                                  self.chunk_size, self.max_tokens, device)

    def read(self, x: torch.Tensor, layout: StreamLayout, state=None):
        """Eq. 6-8 for every stream: ``(m [n_tok, D], S)`` for audio tokens ``x [n_tok, D]`` laid out by
        ``layout``; ``state``: the streams' ``S_{i-1}`` (``None``: fresh memories), ``S``: their last state."""
        x_dtype, x = x.dtype, x.to(self.W_in.weight.dtype)  # the branch runs in float32 over a bf16 host
        S, Ls = layout.n_streams, layout.length
        table = torch.cat([self.P, self.W_in(x), self.P.new_zeros(1, self.P.shape[1])])
        # index_select, not table[src]: its backward (index_add) sums the many reads of P and of the
        # copied chunks in a fixed order; advanced indexing's does not on CPU (results varied across runs)
        z = torch.index_select(table, 0, layout.src).view(S, Ls, -1)           # Eq. 6: [P; W_in h] per slot
        mem = self.memory
        mem.chunk_size = mem.store_chunk_size = mem.retrieve_chunk_size = layout.chunk
        mem.reduce_to_chunk_rep.set_counts(layout.counts)
        ttt = None
        if self.surprise == "sequential":
            # one chunk (one utterance) per mini-batch: the weights move after each, and the next
            # chunk's surprise is taken at them (Titans); the call's own positions restart at 0 so that
            # the mini-batch boundaries fall on this call's chunk boundaries whatever came before
            ttt = layout.chunk
            if state is not None:
                state = state._replace(seq_index=0)
        try:
            r, state = mem(z, state=state, store_mask=layout.mask, ttt_batch_size=ttt)   # Eq. 7
        finally:
            mem.reduce_to_chunk_rep.set_counts(None)
        return self.W_out(r.reshape(S * Ls, -1)[layout.tok_dst]).to(x_dtype), state   # Eq. 8 / Eq. 3

    def retrieve(self, h: torch.Tensor, state=None):
        """``(m [B, T, D], S_i)`` for hidden states ``h [B, T, D]`` (B streams, one utterance each) and
        their states ``S_{i-1}``."""
        B, T, D = h.shape
        m, state = self.read(h.reshape(B * T, D), self.layout([T] * B, h.device), state)
        return m.view(B, T, D), state

    def inject(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """The injection of the read-out ``m`` into the hidden states ``x`` (same shape)."""
        raise NotImplementedError

    def forward(self, h: torch.Tensor, state=None):
        m, state = self.retrieve(h, state)
        return self.inject(h, m), state


class TitansMemoryMethod(ContextMethod):
    """Base of ``mal`` / ``mac`` / ``mag`` (and of ``ttt`` / ``retrieval``, other memories in the same
    branch): branches hooked into LM blocks, state carried across the
    dialogue, the two-stage schedule. Subclasses set ``branch_cls`` and, if the injection changes the
    sequence, override :meth:`_inject`."""

    config_cls = TitansMemoryConfig
    uses_context = True
    phases = 2
    phase1_of = "lora"  # fit_task_lora: the lora cell's training, replayed from the Phase-1 cache
    variant_options = ("speaker_memory", "surprise")  # mal[speaker], mal[m0-surprise]
    branch_cls: ClassVar[type[MemoryBranch]]
    # Phase 1 at each preset is `lora`'s (LORA_PRESETS), by construction
    presets = phase1_presets({
        "smoke": dict(d_m=16, epochs=1, lr=3e-3, gate_lr=1e-2, batch_dialogues=8),
        # CPU-sized: d_m scaled to the tiny LM (D=64), larger steps than the 7B paper setting, and one
        # memory state per speaker (the paper keeps one per dialogue: `--preset paper`, or
        # `--set mal.speaker_memory=false`); see the README's "Memory per speaker". The surprise at M_0
        # (titans-pytorch without batch_size), chosen by measurement over Titans' sequential rule (3 seeds:
        # better on synthetic, tied on Emo-DB, cheaper; results/forms-*; `--set mal.surprise=sequential`)
        "default": dict(d_m=16, epochs=3, lr=3e-3, gate_lr=5e-2, batch_dialogues=8, speaker_memory=True,
                        surprise="initial"),
    })

    @classmethod
    def variant(cls, config: TitansMemoryConfig) -> str:
        """``speaker`` with one memory state per speaker (the paper keeps one per dialogue); ``m0-surprise``
        with every surprise gradient at the initial memory (Titans takes step t's at M_{t-1});
        comma-joined when both (``mal[speaker,m0-surprise]``)."""
        return ",".join(v for v, on in (("speaker", config.speaker_memory),
                                        ("m0-surprise", config.surprise == "initial")) if on)

    @classmethod
    def search_space(cls, trial):
        """Phase 1's LoRA, then the memory: width d_m, N_p, placement, Phase-2 epochs and the two
        learning rates (memory and gates), after the paper's ablation axes (Sec. 3.2-3.4)."""
        return {**two_stage_search_space(trial),
                "d_m": trial.suggest_categorical("d_m", [16, 32, 64, 128]),
                "n_persistent": trial.suggest_categorical("n_persistent", [0, 4, 8]),
                "layers": trial.suggest_categorical("layers", ["all", "quartile", "0"])}

    def __init__(self, backbone, labels, config=None, seed=0):
        super().__init__(backbone, labels, config, seed)
        self.lora_params = attach_lora(self.lm, self.config.lora)
        self.layer_ids = resolve_layers(self.config.layers, len(self.lm.layers))
        # Branches draw from their own RNG stream so that Phase 1 (init, data order, dropout) is
        # bit-identical to the `lora` method under the same seed: memory vs LoRA isolates the memory.
        with auxiliary_rng(seed):
            self.branches = nn.ModuleDict({str(l): self.branch_cls(self.lm.hidden_size, self.config,
                                                                   backbone.max_audio_tokens)
                                           for l in self.layer_ids}).to(self.lm.lm_head.weight.device)
        self._memory_removed = False  # True in Phase 1, and after it when dev selected Phase 1
        for l, block in enumerate(self.lm.layers):
            block.register_forward_pre_hook(self._make_hook(l), with_kwargs=True)
        self._active: MemoryPass | None = None  # None: memory removed (Phase 1); else the current forward
        self.reset()

    # ------------------------------------------------------------------ the hooks
    def _make_hook(self, layer: int):
        key = str(layer)

        def hook(module, args, kwargs):
            if self._active is None:
                return None
            ctx = self._active
            kwargs.update(ctx.block_kwargs)  # after a MAC insertion: the new positions and mask
            h = args[0]  # [B, L, D] residual stream before the block
            if key in self.branches:
                h, kwargs = self._inject(key, h, kwargs, ctx)
            return (h,) + tuple(args[1:]), kwargs
        return hook

    def _inject(self, key: str, h: torch.Tensor, kwargs: dict, ctx: MemoryPass):
        """Apply branch ``key`` to the audio tokens of ``h [B, L, D]`` (MAL, MAG: token positions
        untouched). Returns the new ``(h, block kwargs)``."""
        lay, branch = ctx.layout, self.branches[key]
        x = h[lay.b_idx, lay.pos_idx]                                            # [n_tok, D]
        m, ctx.states[key] = branch.read(x, lay, ctx.states.get(key))
        return h.index_put((lay.b_idx, lay.pos_idx), branch.inject(x, m)), kwargs

    @contextmanager
    def memory_active(self, states: dict) -> Iterator[MemoryPass]:
        """Run LM forwards with the memory on, reading and updating ``states`` (layer key -> NeuralMemState)."""
        self._active = MemoryPass(states)
        try:
            yield self._active
        finally:
            self._active = None

    def _forward(self, ctx: MemoryPass, embeddings: Sequence[torch.Tensor], streams: Sequence[Sequence[int]]):
        """Label logits ``[B, C]`` for B utterances (audio embeddings ``[T_b, D]``) in memory ``streams``
        (lists of utterance indices in turn order), memory on, one LM forward for all of them."""
        batch = self.lm.batch([[Segment(e)] for e in embeddings])
        n_p, chunk_size = self._layout_options()
        ctx.start(batch, StreamLayout.build([sp[-1] for sp in batch.audio_spans], streams, n_p, chunk_size,
                                            self.backbone.max_audio_tokens, batch.inputs_embeds.device))
        return self.lm(batch)

    def _layout_options(self) -> tuple[int, int | str]:
        """``(N_p, chunk_size)`` of the memory input's :class:`StreamLayout` (a branch without
        persistent tokens or titans-pytorch chunking returns ``(0, "utterance")``)."""
        return self.config.n_persistent, self.config.chunk_size

    def _forward_turn(self, ctx: MemoryPass, embeddings: list[torch.Tensor]) -> torch.Tensor:
        """Label logits ``[B, C]`` for one turn of B memory streams (``ctx.states`` batched over them)."""
        return self._forward(ctx, embeddings, [[b] for b in range(len(embeddings))])

    def _dialogue_streams(self, dialogues: Sequence[Sequence[UtteranceInput]]) -> list[list[int]]:
        """Memory streams of dialogues laid out one after the other (flat utterance indices): one per
        dialogue, or one per speaker of each dialogue (``speaker_memory``)."""
        streams, offset = [], 0
        for utts in dialogues:
            keys = self._stream_keys(utts)
            for k in sorted(set(keys)):
                streams.append([offset + t for t, key in enumerate(keys) if key == k])
            offset += len(utts)
        return streams

    def _forward_dialogues(self, dialogues: Sequence[Sequence[UtteranceInput]]) -> torch.Tensor:
        """Label logits ``[sum N_d, C]`` of whole dialogues from fresh memories, every utterance of every
        dialogue in one LM forward (the memory streams run in one titans-pytorch call per branch)."""
        embs = [self.audio_embeddings(u) for utts in dialogues for u in utts]
        with self.memory_active({}) as ctx:
            return self._forward(ctx, embs, self._dialogue_streams(dialogues))

    # ------------------------------------------------------------------ training (Sec. 3.4)
    def memory_parameters(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(the branches' {W_in, W_out, M, P, ...}, their gates)."""
        gates = [p for b in self.branches.values() for p in b.gate_parameters()]
        gate_ids = {id(p) for p in gates}
        rest = [p for b in self.branches.values() for p in b.parameters() if id(p) not in gate_ids]
        return rest, gates

    def fit(self, train, dev, progress=None) -> FitReport:
        c = self.config
        self._memory_removed = True
        if c.phase1 == "lora":
            # Phase 1: task adaptation with the memory removed, exactly as `lora` (dev scored the same way)
            report = fit_task_lora(self, self.lora_params, c.lora, train, dev, progress)
        else:  # phase1=none (the injection ablation): no task LoRA; "Phase 1" is the frozen host, zero-shot
            report = FitReport()
            report.dev_score = dev_epoch_score(self, dev, c.selection_metric,
                                               report.curve(f"{self.name}_phase1_dev_{c.selection_metric}"),
                                               f"{self.name} frozen host (phase1=none)", progress)
            report.selected = {"phase": 1, "epoch": None}
        for p in self.lora_params.values():
            p.requires_grad_(False)
        # Phase 2: memory training, LoRA and backbone frozen. Each step is one LM forward over every
        # utterance of `batch_dialogues` training dialogues, the memory streams (dialogues, or their
        # speakers) stored and read in one titans-pytorch call per branch: backpropagation through
        # each dialogue's memory
        self._memory_removed = False
        rest, gates = self.memory_parameters()
        opt_rest = torch.optim.AdamW(rest, lr=c.lr)
        opt_gate = torch.optim.AdamW(gates, lr=c.gate_lr, weight_decay=0.0) if gates else None
        device = self.lm.lm_head.weight.device
        train = [d for d in train if any(d.scored)]  # a dialogue with no target changes nothing
        labels = [torch.tensor(d.labels, device=device) for d in train]

        def batches():
            order = self.rng.permutation(len(train))
            for i in range(0, len(order), c.batch_dialogues):
                yield order[i:i + c.batch_dialogues]

        def loss(group):
            logits = self._forward_dialogues([train[j].inputs() for j in group])
            # context-only utterances update the memory but are no target
            return nn.functional.cross_entropy(logits, torch.cat([labels[j] for j in group]), ignore_index=UNSCORED)

        def step(value):
            opt_rest.zero_grad()
            if opt_gate is not None:
                opt_gate.zero_grad()
            value.backward()
            nn.utils.clip_grad_norm_(rest, c.grad_clip)
            opt_rest.step()
            if opt_gate is not None:
                nn.utils.clip_grad_norm_(gates, c.gate_grad_clip)
                opt_gate.step()

        # Phase 2 ends at its dev-best epoch; with the phase gate it replaces Phase 1 only if it beats
        # Phase 1's dev score (memory removed, as `lora`)
        run_epochs(self, report, self.name, c.epochs, dev, c.selection_metric,
                   BestCheckpoint(self._memory_state, self._load_memory_state), batches, loss, step,
                   [self.branches], progress, (lambda: {"mean_gate": self.mean_gate()}) if gates else None,
                   phase=2, phase1_score=report.dev_score, gate=c.phase_gate)
        # which model is selected (report.selected): Phase 1 (the memory is then removed: predictions
        # are Phase 1's, i.e. `lora`'s) or Phase 2's dev-best epoch (kept in the branches either way)
        self._memory_removed = report.selected["phase"] == 1
        return report

    def use_phase(self, phase: int) -> None:
        """1: the memory removed (Phase 1: the host + task LoRA, ``lora``'s predictions); 2: the memory
        at Phase 2's dev-best epoch (the branches keep it whichever phase was selected)."""
        if phase not in (1, 2):
            raise ValueError(f"use_phase: expected phase 1 or 2, got {phase!r}")
        self._memory_removed = phase == 1

    def activate_context(self, seed: int = 0) -> None:
        """The conformance kit's hook: the memory back on when dev selected Phase 1 (``memory_removed``),
        zero gates opened (MAL's alpha, MAG's W_g: the default rule), and a scalar or vector gate that
        Phase 2 barely moved from zero (every value within +-0.5: MAL's or retrieval's alpha after a
        short smoke training, tanh(alpha) near 0) set to ``0.5 + U[0, 1)`` as a zero one would be."""
        self._memory_removed = False
        super().activate_context(seed)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for b in self.branches.values():
                for p in b.gate_parameters():
                    if p.dim() < 2 and p.numel() and bool((p.detach().abs() < 0.5).all()):
                        p.copy_((0.5 + torch.rand(p.shape, generator=g)).to(p))

    def mean_gate(self) -> float:
        """A scalar summary of how open the gates are (logged per Phase-2 epoch)."""
        return float("nan")

    def _memory_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.branches.state_dict().items()}

    def _load_memory_state(self, state: dict[str, torch.Tensor]) -> None:
        self.branches.load_state_dict(state)

    # ------------------------------------------------------------------ streaming evaluation (Eq. 1)
    def _stream_keys(self, utterances: Sequence[UtteranceInput]) -> list[int]:
        """Which memory state each turn uses: 0 for all (one per dialogue), or the speaker's index in
        order of first appearance (``speaker_memory``)."""
        if not self.config.history:  # the capacity control: a fresh memory for every utterance
            return list(range(len(utterances)))
        if not self.config.speaker_memory:
            return [0] * len(utterances)
        order: dict[str, int] = {}
        return [order.setdefault(u.speaker, len(order)) for u in utterances]

    def _step_stream(self, utterance: UtteranceInput):
        """The memory stream :meth:`step` reads and writes: 0 (one per dialogue), the speaker
        (``speaker_memory``), or a new one per utterance (``history=False``: the capacity control)."""
        if not self.config.history:
            self.states.clear()
            return 0
        return utterance.speaker if self.config.speaker_memory else 0

    def reset(self) -> None:
        # S_0: no NeuralMemState (a fresh memory) for every branch, per memory stream
        self.states: dict = {}  # stream key (0, or the speaker) -> layer key -> NeuralMemState

    def predict_dialogue(self, utterances: Sequence[UtteranceInput]) -> np.ndarray:
        return self.predict_dialogues([utterances])[0]

    @torch.no_grad()
    def predict_dialogues(self, dialogues: Sequence[Sequence[UtteranceInput]]) -> list[np.ndarray]:
        """Whole dialogues, each from a fresh memory, up to ``eval_batch_utterances`` utterances per LM
        forward; the same predictions as streaming each with :meth:`step` (within float rounding:
        the conformance suite's ``PREFIX_ATOL``)."""
        if self._memory_removed:  # Phase 1 (dev scoring, or Phase 1 selected): the host + LoRA, like `lora`
            return UtteranceLevelMethod.predict_dialogues(self, dialogues)
        self.lm.eval()
        self.branches.eval()
        out = []
        for group in utterance_groups(dialogues, self.config.eval_batch_utterances):
            probs = torch.softmax(self._forward_dialogues(group).float(), -1).cpu().numpy()
            out.extend(np.split(probs, np.cumsum([len(d) for d in group])[:-1]))
        return out

    @torch.no_grad()
    def step(self, utterance: UtteranceInput) -> np.ndarray:
        if self._memory_removed:
            return UtteranceLevelMethod.predict_dialogue(self, [utterance])[0]
        self.lm.eval()
        self.branches.eval()
        with self.memory_active(self.states.setdefault(self._step_stream(utterance), {})) as ctx:
            logits = self._forward_turn(ctx, [self.audio_embeddings(utterance)])
        return torch.softmax(logits.float(), -1).numpy()[0]

    def fitted_state(self) -> dict[str, torch.Tensor]:
        # whether dev selected Phase 1 (memory removed) or Phase 2
        return {"memory_removed": torch.tensor(int(self._memory_removed))}

    def load_fitted_state(self, state: dict[str, torch.Tensor]) -> None:
        self._memory_removed = bool(state["memory_removed"]) if "memory_removed" in state else False

    def trained_parameters(self):
        params = dict(self.lora_params) if self.config.phase1 == "lora" else {}  # phase1=none: no LoRA trains
        params.update({f"{self.name}.{n}": p for n, p in self.branches.named_parameters()})
        return params
