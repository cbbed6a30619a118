"""Compile the Triton kernels for a GPU ahead of time, on a machine without one.

The interpreter the CPU tests run under executes the kernels with numpy and never lowers
them, so what only the real compiler rejects (types the interpreter coerces, layouts, too
much shared memory) would first show on a lent GPU, at the price of its time. This script
records the exact arguments real launches pass (svdq's launchers run on CPU tensors with the
kernels replaced by a recorder), compiles every distinct launch with ``triton.compile`` for a
CUDA target (default sm_90, the H200) and prints one row per variant: registers per thread,
local memory per thread (spills) and shared memory, from ``cuobjdump --dump-resource-usage``
of the compiled binary.

    python bench/aot_compile.py                 # every variant below (a few minutes, cached after)
    python bench/aot_compile.py --quick         # head_dim 128 only
    python bench/aot_compile.py --quick --values latent   # what tests/test_kernels.py runs

Exit status 1 when a variant fails to compile (its error is printed in its row).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

os.environ.pop("TRITON_INTERPRET", None)  # compile for real (the launchers also pick GPU block sizes)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from svdq import CodecConfig, RopeConfig, compress  # noqa: E402
from svdq.attention import SparsityConfig, select_body_tokens_many  # noqa: E402
from svdq.kernels import decode_attention, token_scores  # noqa: E402
from svdq.values import DEFAULT_VALUE_CODEC, ValueConfig, compress_values  # noqa: E402

_POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int32: "*i32",
                  torch.int64: "*i64", torch.uint8: "*u8"}
ROPE = RopeConfig(theta=500000.0)


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **constexprs)`` records."""

    def __init__(self, kernel, launches: list) -> None:
        self.kernel, self.launches = kernel, launches

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, **constexprs):
            self.launches.append((self.kernel, args, constexprs, num_warps))
        return launch


def _signature(kernel, args: tuple, constexprs: dict) -> dict[str, str]:
    signature = {}
    for name, value in zip(kernel.arg_names, list(args) + [None] * len(constexprs), strict=True):
        if name in constexprs:
            signature[name] = "constexpr"
        elif isinstance(value, torch.Tensor):
            signature[name] = _POINTER_TYPES[value.dtype]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:  # int: as the JIT types it
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
    return signature


def _sequence(tokens: int, kv_heads: int, head_dim: int, values: str, exact: int = 0):
    generator = torch.Generator().manual_seed(tokens + head_dim)
    channels = kv_heads * head_dim
    factors = torch.randn(tokens, 16, generator=generator) * torch.logspace(1, -1, 16)
    keys = (factors @ torch.randn(16, channels, generator=generator)).reshape(tokens, kv_heads, head_dim)
    compressed = compress(keys.half(), CodecConfig(exact_tokens=exact), rope=ROPE)
    raw = (keys.flip(0) * 0.5).half()
    config = {"16-bit": ValueConfig(), "4-bit": ValueConfig(bits=4, group_size=32),
              "latent": ValueConfig(codec=DEFAULT_VALUE_CODEC)}[values]
    return compressed, compress_values(raw, config)


VALUE_FORMATS = ("16-bit", "4-bit", "latent")


def record_launches(quick: bool, value_formats: tuple[str, ...] = VALUE_FORMATS) -> list:
    """(kernel, args, constexprs, num_warps) of every launch of the cases below: per shape
    (SmolLM2-like 64, Llama-3-8B 128, 256) each value format, dense and sparse, latent values
    also with exact key tokens and a softcap, and the selection score."""
    launches: list = []
    shapes = [(8, 4, 128)] if quick else [(3, 3, 64), (8, 4, 128), (1, 8, 256)]  # (Hkv, GQA, head_dim)
    patches = [mock.patch.object(module, name, _Recorder(getattr(module, name), launches))
               for module, name in [(decode_attention, "_decode_attention_kernel"),
                                    (decode_attention, "_latent_values_kernel"),
                                    (decode_attention, "_reduce_splits_kernel"),
                                    (token_scores, "_token_scores_kernel")]]
    for patch in patches:
        patch.start()
    try:
        for kv_heads, gqa, head_dim in shapes:
            queries = torch.randn(2, kv_heads * gqa, head_dim, generator=torch.Generator().manual_seed(1))
            for values in value_formats:
                for exact, softcap in [(0, None), (8, 50.0)] if values == "latent" else [(0, None)]:
                    first = _sequence(600, kv_heads, head_dim, values, exact)
                    second = _sequence(333, kv_heads, head_dim, values)
                    keys, stored = [first[0], second[0]], [first[1], second[1]]
                    for sparsity in (None, SparsityConfig(keep_fraction=1 / 8)):
                        selections = [select_body_tokens_many(queries[b:b + 1], keys[b], sparsity)[0] for b in range(2)]
                        decode_attention.attend_triton(queries, keys, stored, head_dim ** -0.5, selections, softcap)
            if value_formats == VALUE_FORMATS:
                token_scores.token_scores_triton(queries, first[0], 32, 256)
    finally:
        for patch in patches:
            patch.stop()
    return launches


def resource_usage(cubin: bytes, cuobjdump: str) -> str:
    """``REG:.. STACK:.. SHARED:.. LOCAL:..`` of the kernel in ``cubin``."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        text = subprocess.run([cuobjdump, "--dump-resource-usage", handle.name], capture_output=True, text=True,
                              check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", text)
    return match.group(0) if match else text.strip().splitlines()[-1]


CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_variants(launches: list, arch: int = 90):
    """Compile each distinct recorded launch for ``sm_<arch>``; yields ``(kernel name,
    constexprs, num_warps, resources or None, error or None)``."""
    target = GPUTarget("cuda", arch, 32)
    seen = set()
    for kernel, launch_args, constexprs, num_warps in launches:
        signature = _signature(kernel, launch_args, constexprs)
        key = (kernel.__name__, tuple(signature.items()), tuple(sorted(constexprs.items())), num_warps)
        if key in seen:
            continue
        seen.add(key)
        try:
            compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=target,
                                      options={"num_warps": num_warps})
        except Exception as error:  # noqa: BLE001 - every failure is a row of the report
            yield kernel.__name__, constexprs, num_warps, None, f"{type(error).__name__}: {error}"
            continue
        yield kernel.__name__, constexprs, num_warps, resource_usage(compiled.asm["cubin"], str(CUOBJDUMP)), None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability without the dot (90 = H100/H200)")
    parser.add_argument("--quick", action="store_true", help="only head_dim 128 (Llama-3-8B shapes)")
    parser.add_argument("--values", nargs="+", choices=VALUE_FORMATS, default=list(VALUE_FORMATS),
                        help="value formats of the attention launches (all: also the selection score)")
    args = parser.parse_args(argv)
    logging.getLogger("svdq").setLevel(logging.ERROR)  # the toy sequences miss their bit budgets
    started = time.perf_counter()
    count = failed = 0
    print(f"triton {triton.__version__}, target sm_{args.arch}\n")
    print("| kernel | constexprs | warps | resources (per thread; shared per block) |")
    print("| --- | --- | ---: | --- |")
    for name, constexprs, num_warps, usage, error in compile_variants(record_launches(args.quick, tuple(args.values)),
                                                                      args.arch):
        count += 1
        if error is not None:
            failed += 1
            usage = "FAILED: " + error.strip().splitlines()[-1][:300]
        shown = ", ".join(f"{key}={value}" for key, value in constexprs.items())
        print(f"| {name} | {shown} | {num_warps} | {usage} |", flush=True)
    print(f"\n{count} variants, {failed} failed, {time.perf_counter() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
