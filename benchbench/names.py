"""The registries of the method and backbone axes, by name: built-ins as ``"module:attr"`` strings,
plugins through entry points, nothing imported until an entry is used. Checking the names on a
command line, or listing them, needs no torch. (Tasks' registry, equally light, is
:data:`benchbench.task.TASKS`.) :mod:`benchbench.method` and :mod:`benchbench.backbone` re-export
these as ``METHODS`` and ``BACKBONES``.
"""

from __future__ import annotations

from .registry import Registry

METHODS: Registry = Registry("method")
"""ContextMethod subclasses by name."""
METHODS.register("zero_shot", "benchbench.methods.zero_shot:ZeroShot")
METHODS.register("lora", "benchbench.methods.lora:LoRAMethod")
METHODS.register("full_context", "benchbench.methods.full_context:FullContext")
METHODS.register("mal", "benchbench.methods.mal:MemoryAsALayer")
METHODS.register("mac", "benchbench.methods.mac:MemoryAsContext")
METHODS.register("mag", "benchbench.methods.mag:MemoryAsGating")
METHODS.register("dpm", "benchbench.methods.dpm:DynamicParameterMemory")
METHODS.register("hmm", "benchbench.methods.hmm:HMMFilter")
METHODS.register("ttt", "benchbench.methods.ttt:TestTimeTraining")
METHODS.register("rmt", "benchbench.methods.rmt:RecurrentMemory")
METHODS.register("retrieval", "benchbench.methods.retrieval:TurnRetrieval")

BACKBONES: Registry = Registry("backbone")
"""BackboneSpec objects by name."""
for _name, _target in (("tiny-qwen2-audio", "qwen2_audio:TINY_QWEN2_AUDIO"),
                       ("qwen2-audio-whisper-tiny", "qwen2_audio:QWEN2_AUDIO_WHISPER_TINY"),
                       ("audio-flamingo-3-whisper-tiny", "audio_flamingo_3:AUDIO_FLAMINGO_3_WHISPER_TINY"),
                       ("ultravox-whisper-tiny", "ultravox:ULTRAVOX_WHISPER_TINY"),
                       ("ultravox-whisper-tiny-smollm2-135m", "ultravox:ULTRAVOX_WHISPER_TINY_SMOLLM2"),
                       ("tiny-audio-flamingo-3", "audio_flamingo_3:TINY_AUDIO_FLAMINGO_3"),
                       ("tiny-ultravox", "ultravox:TINY_ULTRAVOX"),
                       ("qwen2-audio-7b", "qwen2_audio:QWEN2_AUDIO_7B"),
                       ("audio-flamingo-3", "audio_flamingo_3:AUDIO_FLAMINGO_3"),
                       ("ultravox-v0.4", "ultravox:ULTRAVOX_V0_4")):
    BACKBONES.register(_name, f"benchbench.backbones.{_target}")


def backbone_note(label: str) -> str:
    """The registered backbone's ``note`` (:class:`benchbench.backbone.BackboneSpec`) for a results
    label (``name`` or ``name+option=value``); ``""`` for an unknown or broken backbone, or none."""
    try:
        return getattr(BACKBONES.get(label.split("+", 1)[0].split(" ", 1)[0]), "note", "") or ""
    except Exception:  # noqa: BLE001 - a result from a backbone not installed here still renders
        return ""
