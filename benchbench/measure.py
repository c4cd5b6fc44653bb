"""What a cell costs: peak memory (resident and CUDA) and a method's test-time counters."""

from __future__ import annotations

from pathlib import Path

import torch


def reset_peak_memory() -> None:
    """Start a new peak-memory window: Linux's VmHWM (``/proc/self/clear_refs``) and CUDA's counters."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux, or not allowed: the peak then covers the process so far
        pass
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process since :func:`reset_peak_memory`, in MiB (``peak_rss_mb``:
    the backbone included, read from ``/proc/self/status`` VmHWM, else ``resource.getrusage``), and
    ``peak_cuda_mb`` (``torch.cuda.max_memory_allocated``) where CUDA is in use."""
    out = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["peak_rss_mb"] = int(line.split()[1]) / 1024  # kB
    except OSError:
        import resource

        out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def test_time_costs(counters: dict[str, float], n_test: int) -> dict[str, float]:
    """A method's test-time counters (``ContextMethod.test_time_cost``) as logged costs: ``*_seconds``
    totals also become ``*_ms_per_utterance`` and ``test_time_updates`` also
    ``test_time_updates_per_utterance`` (``n_test``: utterances streamed)."""
    out = dict(counters)
    for k, v in counters.items():
        if k.endswith("_seconds"):
            out[k[: -len("_seconds")] + "_ms_per_utterance"] = 1000 * v / n_test
    if "test_time_updates" in counters:
        out["test_time_updates_per_utterance"] = counters["test_time_updates"] / n_test
    return out
