"""``synthetic``: dialogues whose emotion needs the speaker baseline (Titans-as-a-Layer Sec. 1).

Generative model (all seeded by the task seed; units are z-scores of three prosodic latents,
f0, energy and speaking rate):

* every dialogue has two new speakers; speaker s has a baseline ``b_s ~ N(0, sigma_b^2 I_3)``;
* each speaker's emotion follows a sticky Markov chain: the first from the uniform distribution,
  then the same emotion with probability ``p_stay``, else a uniformly drawn other one;
* turns alternate between the speakers (the same speaker keeps the floor with ``p_hold``);
* utterance prosody ``x = b_s + o_e + n``, ``n ~ N(0, sigma_n^2 I_3)``, with emotion offsets
  ``o_e`` (:data:`EMOTION_OFFSETS`);
* ``x`` is rendered to a 16 kHz waveform: a harmonic voice source at
  ``f0 = 160 * 2**(x_f0 / 4)`` Hz, level ``-20 + 4 x_energy`` dBFS, syllables at
  ``4 * 2**(x_rate / 5)`` per second with voiced fraction ``0.5 + 0.1 x_rate`` (fast speech pauses
  less), in the speaker's own voice timbre (spectral tilt and a formant: speaker identity, no
  emotion), with random phase, jitter and a fixed noise floor (nuisances).

Because ``sigma_b`` is comparable to the emotion offsets, one utterance alone says little about the
emotion; the same speaker's earlier utterances reveal the baseline, and the voice tells whose
earlier utterances they are. Reference ceilings (:meth:`SyntheticProsodyTask.ceilings`), by Monte
Carlo from the latents:

* ``context_free``: the Bayes accuracy of the best classifier that sees one utterance's ``x``
  (and the waveform is a function of ``x``, the voice and nuisances that carry no emotion
  information, so no utterance-level method can beat it);
* ``speaker_history``: the causal Bayes rule that also sees the same speaker's earlier utterances;
* ``baseline_known``: the Bayes accuracy when the speaker baseline ``b_s`` is also known
  (a reference for context methods, not a hard bound: emotional inertia adds information).

Defaults (``sigma_b`` 1.5, ``sigma_n`` 0.3, ``p_stay`` 0.5, 10 turns): context_free 0.53,
speaker_history 0.78, baseline_known 0.99.
"""

from __future__ import annotations

import json
import os
import tempfile

import numpy as np

from benchbench.data import Dialogue, Fold, Utterance, UtteranceInput, default_cache_dir, hash_json
from benchbench.task import Task, TaskReference

LABELS = ("anger", "happiness", "neutral", "sadness")
# o_e in z units: (f0, energy, rate).
EMOTION_OFFSETS = np.array([
    [1.0, 1.4, 0.9],    # anger: high pitch, loud, fast
    [1.4, 0.2, -0.3],   # happiness: highest pitch, normal level
    [0.0, 0.0, 0.0],    # neutral
    [-1.0, -1.0, -1.0],  # sadness: low, quiet, slow
])
SAMPLE_RATE = 16000
OCTAVE_Z = (4.0, 5.0)  # z units per octave of f0 and of syllable rate
DB_PER_Z = 4.0         # level change per z unit of energy

PRESETS = {
    #             dialogues (train, dev, test), turns, seconds per utterance
    "smoke": dict(n_train=12, n_dev=4, n_test=6, n_turns=6, duration_s=1.0),
    "default": dict(n_train=480, n_dev=48, n_test=96, n_turns=10, duration_s=1.2),
}
# `bench run --preset paper` runs the methods' paper configs on the default task (the task has no paper)
PRESETS["paper"] = PRESETS["default"]


def random_voice(rng: np.random.Generator) -> tuple[float, float]:
    """A speaker's voice timbre ``(spectral tilt, formant Hz)``: who is speaking, not how they feel."""
    return float(rng.uniform(0.6, 1.6)), float(np.exp(rng.uniform(np.log(500.0), np.log(3000.0))))


def render_waveform(x: np.ndarray, duration_s: float, rng: np.random.Generator,
                    voice: tuple[float, float] = (1.0, 0.0)) -> np.ndarray:
    """Render prosody ``x = (f0, energy, rate)`` in z units to a mono float32 waveform ``[n_samples]``.

    ``voice = (tilt, formant_hz)``: harmonic k has amplitude ``k**-tilt`` times a resonance at
    ``formant_hz`` (0: none); it carries speaker identity and no emotion.
    """
    n = int(round(duration_s * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    f0 = 160.0 * 2 ** (x[0] / OCTAVE_Z[0])
    level_db = -20.0 + DB_PER_Z * x[1]
    rate = 4.0 * 2 ** (x[2] / OCTAVE_Z[1])
    # f0 contour: slight declination and random jitter (nuisance)
    contour = f0 * (1.0 - 0.05 * t / duration_s) * (1.0 + 0.01 * np.sin(2 * np.pi * rng.uniform(3, 6) * t + rng.uniform(0, 6.28)))
    phase = 2 * np.pi * np.cumsum(contour) / SAMPLE_RATE
    k = np.arange(1, 25)[:, None]
    tilt, formant = voice
    gain = k[:, 0] ** -tilt * (1.0 + (4.0 * np.exp(-0.5 * ((k[:, 0] * f0 - formant) / 150.0) ** 2) if formant else 0.0))
    harmonics = np.sin(k * phase[None, :] + rng.uniform(0, 2 * np.pi, (len(k), 1))) * gain[:, None]
    harmonics[(k[:, 0] * f0) > 7000] = 0.0
    source = harmonics.sum(0)
    source /= np.sqrt(np.mean(source ** 2)) + 1e-9
    # syllables at `rate` per second; faster speech also pauses less (voiced fraction `duty`)
    duty = float(np.clip(0.5 + 0.1 * x[2], 0.15, 0.9))
    cycle = (rate * t + rng.uniform(0, 1)) % 1.0
    envelope = np.where(cycle < duty, np.sin(np.pi * np.minimum(cycle / duty, 1.0)), 0.0) ** 0.5
    wav = source * envelope
    wav *= 10 ** (level_db / 20.0) / (np.sqrt(np.mean(wav ** 2)) + 1e-9)
    wav += rng.normal(0.0, 10 ** (-55 / 20), n)
    return np.clip(wav, -1.0, 1.0).astype(np.float32)


class SyntheticProsodyTask(Task):
    """Speaker-baseline dialogues rendered from latent prosody (see module docstring).

    Args:
        preset: ``"smoke"`` (tiny, seconds) or ``"default"``.
        seed: data seed (train, dev and test dialogues all have new speakers).
        sigma_b: sd of speaker baselines; sigma_n: sd of utterance noise; p_stay: emotional inertia;
        p_hold: probability that the same speaker takes the next turn.
    """

    name = "synthetic"
    labels = LABELS
    default_backbone = "tiny-qwen2-audio"  # generated tones, not speech: the random tiny encoder (the main job's)

    def __init__(self, data_dir=None, preset: str = "default", seed: int = 0, sigma_b: float = 1.5,
                 sigma_n: float = 0.3, p_stay: float = 0.5, p_hold: float = 0.2, **overrides):
        super().__init__(None, preset, seed)
        if preset not in PRESETS:
            raise ValueError(f"task synthetic: unknown preset {preset!r} (known: {sorted(PRESETS)})")
        unknown = sorted(set(overrides) - set(PRESETS[preset]))
        if unknown:
            raise ValueError(f"task synthetic: unknown size option(s) {unknown} (known: {sorted(PRESETS[preset])})")
        self.sizes = {**PRESETS[preset], **overrides}
        self.sigma_b, self.sigma_n, self.p_stay, self.p_hold = sigma_b, sigma_n, p_stay, p_hold
        self._folds: list[Fold] | None = None
        self.latents: dict[str, dict] = {}  # utterance_id -> {"x", "b", "emotion"}

    @classmethod
    def option_names(cls) -> list[str]:
        """The constructor's options plus the preset's sizes (``n_train``, ``n_dev``, ``n_test``,
        ``n_turns``, ``duration_s``), which ``**overrides`` replaces."""
        return [n for n in super().option_names() if n != "overrides"] + list(PRESETS["default"])

    def params(self) -> dict:
        return {**super().params(), **self.sizes, "sigma_b": self.sigma_b, "sigma_n": self.sigma_n,
                "p_stay": self.p_stay, "p_hold": self.p_hold}

    def _latent_dialogue(self, rng: np.random.Generator) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
        """One dialogue's latents: ``(speaker index, emotion, x [3], baseline b_s [3])`` per turn."""
        base = rng.normal(0.0, self.sigma_b, (2, 3))
        emo: list[int | None] = [None, None]
        who = int(rng.integers(2))
        turns = []
        for turn in range(self.sizes["n_turns"]):
            if turn > 0 and rng.random() >= self.p_hold:
                who = 1 - who
            prev = emo[who]
            if prev is None:
                e = int(rng.integers(len(LABELS)))
            elif rng.random() < self.p_stay:
                e = prev
            else:
                e = int(rng.choice([c for c in range(len(LABELS)) if c != prev]))
            emo[who] = e
            turns.append((who, e, base[who] + EMOTION_OFFSETS[e] + rng.normal(0.0, self.sigma_n, 3), base[who]))
        return turns

    def _dialogue(self, did: str, rng: np.random.Generator) -> Dialogue:
        spk = [f"{did}-spkA", f"{did}-spkB"]
        utts = []
        latents = self._latent_dialogue(rng)
        voices = [random_voice(rng), random_voice(rng)]
        for turn, (who, e, x, b) in enumerate(latents):
            uid = f"{did}-t{turn:02d}"
            self.latents[uid] = {"x": x, "b": b.copy(), "emotion": e}
            inp = UtteranceInput(uid, did, turn, spk[who], render_waveform(x, self.sizes["duration_s"], rng, voices[who]),
                                SAMPLE_RATE)
            utts.append(Utterance(inp, e))
        return Dialogue(did, tuple(utts))

    def folds(self) -> list[Fold]:
        """The one fold, generated under ``seed`` or read from the on-disk cache
        (``$BENCHBENCH_CACHE/tasks/synthetic/<key>.npz``, keyed by every option, the seed and
        :data:`GENERATOR_VERSION`; the same waveforms and latents bit for bit, tested)."""
        if self._folds is None:
            path = default_cache_dir() / "tasks" / "synthetic" / f"{self.cache_key}.npz"
            if not self._read_cache(path):
                rng = np.random.default_rng([self.seed, 20261121])
                split = {}
                for part in ("train", "dev", "test"):
                    split[part] = tuple(self._dialogue(f"syn-{part}-{i:04d}", rng)
                                        for i in range(self.sizes[f"n_{part}"]))
                self._folds = [Fold(0, split["train"], split["dev"], split["test"])]
                self._write_cache(path)
        return self._folds

    @property
    def cache_key(self) -> str:
        """sha256 of what the generated data depend on: sizes, sigmas, seed, generator version."""
        params = {k: v for k, v in self.params().items() if k not in ("data_dir", "preset")}
        return hash_json({**params, "generator_version": GENERATOR_VERSION})

    def _write_cache(self, path) -> None:
        """Every utterance's waveform, ids, speaker, label and latents in one ``.npz`` (written to a
        temporary file and renamed: a crash never leaves half a cache); an unwritable cache is skipped."""
        fold = self._folds[0]
        utts = [(part, d, u) for part in ("train", "dev", "test") for d in getattr(fold, part) for u in d.utterances]
        meta = [{"part": part, "dialogue": d.dialogue_id, "id": u.utterance_id, "turn": u.input.turn,
                 "speaker": u.input.speaker, "label": int(u.label)} for part, d, u in utts]
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
                np.savez(f, meta=np.array(json.dumps(meta)),
                         lengths=np.array([len(u.input.waveform) for _, _, u in utts]),
                         audio=np.concatenate([u.input.waveform for _, _, u in utts]),
                         x=np.stack([self.latents[u.utterance_id]["x"] for _, _, u in utts]),
                         b=np.stack([self.latents[u.utterance_id]["b"] for _, _, u in utts]))
            os.replace(f.name, path)
        except OSError:
            pass

    def _read_cache(self, path) -> bool:
        """Rebuild the fold and the latents from ``path``; ``False`` when there is none (or it is unreadable)."""
        try:
            with np.load(path) as z:
                meta, lengths, audio, x, b = json.loads(str(z["meta"])), z["lengths"], z["audio"], z["x"], z["b"]
        except (OSError, ValueError, KeyError):
            return False
        ends = np.cumsum(lengths)
        parts: dict[str, dict[str, list]] = {"train": {}, "dev": {}, "test": {}}
        for i, m in enumerate(meta):
            wav = audio[ends[i] - lengths[i]:ends[i]]
            self.latents[m["id"]] = {"x": x[i], "b": b[i], "emotion": m["label"]}
            inp = UtteranceInput(m["id"], m["dialogue"], m["turn"], m["speaker"], wav, SAMPLE_RATE)
            parts[m["part"]].setdefault(m["dialogue"], []).append(Utterance(inp, m["label"]))
        split = {p: tuple(Dialogue(did, tuple(us)) for did, us in ds.items()) for p, ds in parts.items()}
        self._folds = [Fold(0, split["train"], split["dev"], split["test"])]
        return True

    def reference(self) -> TaskReference:
        ceilings = self.ceilings()
        return TaskReference(context_free=ceilings.pop("context_free"), ceilings=ceilings,
                             test_ceilings=self.test_ceilings())

    def test_ceilings(self) -> dict:
        """The two Bayes rules of :meth:`ceilings` applied to this task's own test utterances
        (fractions): what the optimal context-free and speaker-history rules score on exactly the
        items every method is scored on, free of the test split's sampling noise around the
        population ceilings."""
        free, history = [], []
        for d in self.folds()[0].test:
            seen: dict[str, list] = {}
            for u in d.utterances:
                lat = self.latents[u.utterance_id]
                x = seen.setdefault(u.input.speaker, [])
                x.append(lat["x"])
                free.append(nearest_offset(lat["x"][None])[0] == lat["emotion"])
                post = speaker_history_posterior(np.array(x), self.sigma_b, self.sigma_n, self.p_stay)
                history.append(int(np.argmax(post)) == lat["emotion"])
        return {"context_free": float(np.mean(free)) if free else float("nan"),
                "speaker_history": float(np.mean(history)) if history else float("nan")}

    def ceilings(self, n: int = 200_000, n_dialogues: int = 600) -> dict:
        """Reference accuracies (fractions), by Monte Carlo from the generative model.

        * ``context_free``: Bayes accuracy from one utterance's ``x`` (emotions are uniform
          marginally and all covariances isotropic and shared, so the rule is nearest offset);
        * ``speaker_history``: accuracy of the causal Bayes rule that also sees the same speaker's
          earlier utterances in the dialogue (:func:`speaker_history_posterior`; at most the last
          ``HISTORY_WINDOW`` of them): what a streaming context method can reach;
        * ``baseline_known``: Bayes accuracy with the speaker baseline ``b_s`` given (a reference,
          not a bound: inertia adds information).
        """
        rng = np.random.default_rng([self.seed, 7])
        e = rng.integers(len(LABELS), size=n)
        b = rng.normal(0.0, self.sigma_b, (n, 3))
        x = b + EMOTION_OFFSETS[e] + rng.normal(0.0, self.sigma_n, (n, 3))

        hits = []
        for _ in range(n_dialogues):
            history: dict[int, list] = {0: [], 1: []}
            for who, emo, xu, _ in self._latent_dialogue(rng):
                history[who].append(xu)
                post = speaker_history_posterior(np.array(history[who]), self.sigma_b, self.sigma_n, self.p_stay)
                hits.append(int(np.argmax(post)) == emo)
        return {"context_free": float(np.mean(nearest_offset(x) == e)),
                "speaker_history": float(np.mean(hits)),
                "baseline_known": float(np.mean(nearest_offset(x - b) == e)),
                "chance": 1.0 / len(LABELS)}


HISTORY_WINDOW = 7
GENERATOR_VERSION = 1
"""Part of the data cache key: raise it when a change to the generator changes the data."""


def nearest_offset(x: np.ndarray) -> np.ndarray:
    """The context-free Bayes rule: the emotion whose offset is nearest to each row of ``x``
    ``[n, 3]`` (z units) -> ``[n]`` class indices (uniform marginal, isotropic shared covariance)."""
    return np.argmin(((x[:, None, :] - EMOTION_OFFSETS[None]) ** 2).sum(-1), axis=1)


def speaker_history_posterior(x: np.ndarray, sigma_b: float, sigma_n: float, p_stay: float) -> np.ndarray:
    """Exact ``p(e_t | x_1..x_t)`` for one speaker's utterances ``x`` ``[t, 3]`` (z units), ``[4]``.

    Sums over the speaker's emotion sequences (sticky chain prior, at most the last
    :data:`HISTORY_WINDOW` utterances) with the baseline marginalised in closed form: given the
    sequence, each prosody dimension of the residuals ``r_i = x_i - o_{e_i}`` is Gaussian with
    covariance ``sigma_n^2 I + sigma_b^2 11^T`` (Sherman-Morrison for the quadratic form; the
    log-determinant is the same for every sequence).
    """
    x = np.asarray(x, dtype=float)[-HISTORY_WINDOW:]
    t, k = len(x), len(LABELS)
    seqs = np.stack(np.meshgrid(*[np.arange(k)] * t, indexing="ij"), -1).reshape(-1, t)  # [k^t, t]
    same = seqs[:, 1:] == seqs[:, :-1]
    log_prior = np.where(same, np.log(p_stay), np.log((1 - p_stay) / (k - 1))).sum(1)
    r = x[None] - EMOTION_OFFSETS[seqs]                      # [k^t, t, 3]
    s1, s2 = r.sum(1), (r ** 2).sum(1)
    quad = (s2 - sigma_b ** 2 * s1 ** 2 / (sigma_n ** 2 + t * sigma_b ** 2)) / sigma_n ** 2
    log_joint = log_prior - 0.5 * quad.sum(-1)
    w = np.exp(log_joint - log_joint.max())
    post = np.bincount(seqs[:, -1], weights=w, minlength=k)
    return post / post.sum()
