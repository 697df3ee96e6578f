"""What the compilers' cache trees look like.

The mount root always holds one directory per layout; `mithrilfs env` points
TRITON_CACHE_DIR and TORCHINDUCTOR_CACHE_DIR at them.
"""

from __future__ import annotations

LAYOUT_ROOTS = ("triton", "inductor")
