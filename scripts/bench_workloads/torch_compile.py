"""torch.compile one small model on CPU; print one JSON line of timings.

Run by scripts/bench.py in a fresh process with TORCHINDUCTOR_CACHE_DIR and
TRITON_CACHE_DIR pointing at the directory under test.  The bench measures
the whole process from outside; the times printed here split it up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where it runs, so that import_s measures it
    import torch

# What the workloads do with a model: call it on its input, eagerly or compiled.
Model = Callable[["torch.Tensor"], "torch.Tensor"]


def _block_class() -> type[torch.nn.Module]:
    import torch
    import torch.nn.functional as F

    class Block(torch.nn.Module):
        """A pre-norm transformer block written out, so inductor generates its kernels."""

        def __init__(self, d_model: int, n_heads: int, d_ff: int) -> None:
            super().__init__()
            self.n_heads = n_heads
            self.norm1 = torch.nn.LayerNorm(d_model)
            self.qkv = torch.nn.Linear(d_model, 3 * d_model)
            self.proj = torch.nn.Linear(d_model, d_model)
            self.norm2 = torch.nn.LayerNorm(d_model)
            self.ff1 = torch.nn.Linear(d_model, d_ff)
            self.ff2 = torch.nn.Linear(d_ff, d_model)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, t, d = x.shape
            q, k, v = self.qkv(self.norm1(x)).split(d, dim=-1)
            q, k, v = (
                z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v)
            )
            att = (q @ k.transpose(-2, -1)) * (d // self.n_heads) ** -0.5
            att = att.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
            y = (att.softmax(dim=-1) @ v).transpose(1, 2).reshape(b, t, d)
            x = x + self.proj(y)
            out: torch.Tensor = x + self.ff2(F.gelu(self.ff1(self.norm2(x))))
            return out

    return Block


def build(name: str) -> tuple[Model, torch.Tensor]:
    """(model, input) of the model called *name*, seeded: the same in every process."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    if name == "mlp":
        model = torch.nn.Sequential(
            torch.nn.Linear(64, 128),
            torch.nn.GELU(),
            torch.nn.Linear(128, 128),
            torch.nn.ReLU(),
            torch.nn.Linear(128, 16),
        ).eval()
        return model, torch.randn(8, 64)
    return _block_class()(d_model=64, n_heads=4, d_ff=128).eval(), torch.randn(2, 16, 64)


def main() -> int:
    t_start = time.perf_counter()
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=["mlp", "transformer"], required=True)
    args = parser.parse_args()

    import torch
    from torch._dynamo.utils import counters

    t_imported = time.perf_counter()
    model, x = build(args.model)
    compiled = torch.compile(model)
    with torch.no_grad():
        out = compiled(x)
        eager = model(x)
    t_compiled = time.perf_counter()
    torch.testing.assert_close(out, eager, rtol=1e-3, atol=1e-3)
    print(
        json.dumps(
            {
                "import_s": t_imported - t_start,
                "compile_s": t_compiled - t_imported,
                "inductor": {k: int(v) for k, v in counters["inductor"].items()},
                "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
