"""triton.compile a vector-add kernel for a CUDA target, without a GPU.

Run as a fresh process with TRITON_CACHE_DIR pointing into a mithrilfs
mount.  ``--arch 90`` compiles for GPUTarget('cuda', 90, 32) with triton's
bundled ptxas.  The last stdout line is JSON: whether the compile was served
from the cache (triton's compilation listener reports ``cache_hit``), the
kernel's cache key, a sha256 per ``asm`` stage (source, ttir, ..., ptx,
cubin) and the cache files the kernel's metadata group names.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget


@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offsets = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, x + y, mask=mask)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability")
    args = parser.parse_args()

    events: list[dict[str, object]] = []

    def listener(*, src, metadata, metadata_group, times, cache_hit):
        events.append({"cache_hit": bool(cache_hit), "group": sorted(metadata_group)})

    triton.knobs.compilation.listener = listener
    src = triton.compiler.ASTSource(
        fn=add_kernel,
        signature={
            "x_ptr": "*fp32",
            "y_ptr": "*fp32",
            "out_ptr": "*fp32",
            "n": "i32",
            "BLOCK": "constexpr",
        },
        constexprs={"BLOCK": 128},
    )
    kernel = triton.compile(src, target=GPUTarget("cuda", args.arch, 32))
    assert len(events) == 1, events

    def digest(value: str | bytes) -> str:
        return hashlib.sha256(value.encode() if isinstance(value, str) else value).hexdigest()

    cache_dir = triton.knobs.cache.dir
    group_files = {
        name: os.path.relpath(path, cache_dir) for name, path in kernel.metadata_group.items()
    }
    print(
        json.dumps(
            {
                "cache_hit": events[0]["cache_hit"],
                "hash": kernel.hash,
                "asm": {stage: digest(value) for stage, value in kernel.asm.items()},
                "cubin_size": len(kernel.asm["cubin"]),
                "group_files": group_files,
                "cache_dir": cache_dir,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
