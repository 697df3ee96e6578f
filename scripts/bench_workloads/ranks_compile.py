"""One rank of a job: torch.compile the same small model as every other rank.

Started by scripts/bench.py through torchrun (``python -m torch.distributed.run
--nproc-per-node N``) on CPU with the gloo backend, every rank with the same
TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR, as the ranks of one job on a
GPU node share the node's cache.  The ranks start together (a barrier before
the compile), compile, and meet again; rank 0 prints one JSON line with every
rank's compile time and inductor's cache counters summed over the ranks.
"""

from __future__ import annotations

import json
import os
import sys
import time

from torch_compile import build  # scripts/bench_workloads/, this script's directory


def main() -> int:
    import torch
    import torch.distributed as dist
    from torch._dynamo.utils import counters

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model, x = build("mlp")  # the model of the torch_mlp workload
    dist.barrier()
    t0 = time.perf_counter()
    with torch.no_grad():
        out = torch.compile(model)(x)
    compile_s = time.perf_counter() - t0
    torch.testing.assert_close(out, model(x), rtol=1e-3, atol=1e-3)
    mine = {
        "compile_s": compile_s,
        "fxgraph_cache_hit": int(counters["inductor"]["fxgraph_cache_hit"]),
        "fxgraph_cache_miss": int(counters["inductor"]["fxgraph_cache_miss"]),
    }
    gathered: list[dict[str, float] | None] = [None] * world
    dist.all_gather_object(gathered, mine)
    if rank == 0:
        ranks = [g for g in gathered if g is not None]
        print(
            json.dumps(
                {
                    "ranks": world,
                    "compile_s": [r["compile_s"] for r in ranks],
                    "fxgraph_cache_hit": sum(int(r["fxgraph_cache_hit"]) for r in ranks),
                    "fxgraph_cache_miss": sum(int(r["fxgraph_cache_miss"]) for r in ranks),
                    "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
                }
            ),
            flush=True,
        )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
