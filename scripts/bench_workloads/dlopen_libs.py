"""dlopen (ctypes.CDLL) each given .so in this fresh process; print per-call ns as JSON."""

from __future__ import annotations

import ctypes
import json
import sys
import time


def main() -> int:
    times = []
    for path in sys.argv[1:]:
        t0 = time.perf_counter_ns()
        lib = ctypes.CDLL(path)
        value = lib.bench_value()
        times.append(time.perf_counter_ns() - t0)
        assert value > 0
    print(json.dumps({"dlopen_ns": times}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
