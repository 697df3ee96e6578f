"""torch.compile a tiny MLP on CPU and report inductor's cache counters.

Run as a fresh process with TORCHINDUCTOR_CACHE_DIR (and TRITON_CACHE_DIR)
already pointing into a mithrilfs mount, or with ``--activate MOUNTPOINT`` to
point them there itself through ``mithrilfs.hooks.activate`` before torch is
imported.  The last stdout line is JSON: the cache counters, a checksum of the
output for a fixed input, and the cache directories inductor resolved.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--activate", metavar="MOUNTPOINT", help="call mithrilfs.hooks.activate")
    args = parser.parse_args()
    if args.activate:
        import mithrilfs.hooks

        mithrilfs.hooks.activate(args.activate)
        assert "torch" not in sys.modules

    import torch
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    # Nothing may route around the local on-disk cache.
    assert inductor_config.fx_graph_cache, "TORCHINDUCTOR_FX_GRAPH_CACHE must be on"
    assert not inductor_config.force_disable_caches
    assert not inductor_config.fx_graph_remote_cache

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(16, 32),
        torch.nn.ReLU(),
        torch.nn.Linear(32, 8),
    ).eval()
    compiled = torch.compile(model)
    x = torch.linspace(-1.0, 1.0, 4 * 16).reshape(4, 16)
    with torch.no_grad():
        out = compiled(x)
        eager = model(x)
    torch.testing.assert_close(out, eager)

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    print(
        json.dumps(
            {
                "inductor": {k: int(v) for k, v in counters["inductor"].items()},
                "aot_autograd": {k: int(v) for k, v in counters["aot_autograd"].items()},
                "checksum": hashlib.sha256(out.contiguous().numpy().tobytes()).hexdigest(),
                "cache_dir": cache_dir(),
                "env": {
                    k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
                },
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
