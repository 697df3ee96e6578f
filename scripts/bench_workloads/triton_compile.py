"""triton.compile a few small kernels for sm80 and sm90 (no GPU needed).

Run by scripts/bench.py in a fresh process with TRITON_CACHE_DIR pointing at
the directory under test; prints one JSON line of timings.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    t_start = time.perf_counter()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    @triton.jit
    def add_kernel(x, y, out, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(out + offs, tl.load(x + offs, mask=mask) + tl.load(y + offs, mask=mask), mask=mask)

    @triton.jit
    def softmax_kernel(out, inp, stride, n_cols, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(inp + row * stride + cols, mask=mask, other=-float("inf"))
        x = x - tl.max(x, axis=0)
        num = tl.exp(x)
        tl.store(out + row * stride + cols, num / tl.sum(num, axis=0), mask=mask)

    @triton.jit
    def layernorm_kernel(out, inp, w, b, stride, n_cols, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        x = tl.load(inp + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=0) / n_cols
        diff = tl.where(mask, x - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, axis=0) / n_cols + eps)
        y = diff * rstd * tl.load(w + cols, mask=mask) + tl.load(b + cols, mask=mask)
        tl.store(out + row * stride + cols, y, mask=mask)

    @triton.jit
    def matmul_kernel(
        a,
        b,
        c,
        M,
        N,
        K,
        sam,
        sak,
        sbk,
        sbn,
        scm,
        scn,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        rk = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            pa = a + rm[:, None] * sam + (k + rk)[None, :] * sak
            pb = b + (k + rk)[:, None] * sbk + rn[None, :] * sbn
            acc += tl.dot(tl.load(pa), tl.load(pb))
        tl.store(c + rm[:, None] * scm + rn[None, :] * scn, acc.to(tl.float16))

    p32, p16 = "*fp32", "*fp16"
    kernels = [
        (
            add_kernel,
            {"x": p32, "y": p32, "out": p32, "n": "i32", "BLOCK": "constexpr"},
            {"BLOCK": 1024},
        ),
        (
            softmax_kernel,
            {"out": p32, "inp": p32, "stride": "i32", "n_cols": "i32", "BLOCK": "constexpr"},
            {"BLOCK": 512},
        ),
        (
            layernorm_kernel,
            {
                "out": p32,
                "inp": p32,
                "w": p32,
                "b": p32,
                "stride": "i32",
                "n_cols": "i32",
                "eps": "fp32",
                "BLOCK": "constexpr",
            },
            {"BLOCK": 256},
        ),
        (
            matmul_kernel,
            {
                "a": p16,
                "b": p16,
                "c": p16,
                "M": "i32",
                "N": "i32",
                "K": "i32",
                "sam": "i32",
                "sak": "i32",
                "sbk": "i32",
                "sbn": "i32",
                "scm": "i32",
                "scn": "i32",
                "BM": "constexpr",
                "BN": "constexpr",
                "BK": "constexpr",
            },
            {"BM": 64, "BN": 64, "BK": 32},
        ),
    ]
    t_imported = time.perf_counter()
    per_kernel = {}
    for cc in (80, 90):
        target = GPUTarget("cuda", cc, 32)
        for fn, signature, constexprs in kernels:
            t0 = time.perf_counter()
            compiled = triton.compile(ASTSource(fn, signature, constexprs), target=target)
            assert compiled.asm.get("cubin"), "no cubin produced"
            per_kernel[f"{fn.__name__}_sm{cc}"] = time.perf_counter() - t0
    t_done = time.perf_counter()
    print(
        json.dumps(
            {
                "import_s": t_imported - t_start,
                "compile_s": t_done - t_imported,
                "per_kernel_s": per_kernel,
                "cache_dir": os.environ.get("TRITON_CACHE_DIR"),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
