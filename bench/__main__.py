"""Run every benchmark; each writes its markdown table under bench/results/.

    python -m bench                 # all
    python -m bench save step       # those whose module name contains a word

Only ``bench_*`` modules are benchmarks: the reliability soak (``python -m bench.soak``,
half an hour for its 1,000 kills) is run on its own and writes docs/RELIABILITY.md.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
import time
from pathlib import Path


def chosen(argv: list[str]) -> list[str]:
    """The benchmark modules ``argv`` selects (all of them when it is empty)."""
    here = Path(__file__).parent
    names = sorted(m.name for m in pkgutil.iter_modules([str(here)]) if m.name.startswith("bench_"))
    return [n for n in names if not argv or any(a in n for a in argv)]


def main(argv: list[str]) -> None:
    for name in chosen(argv):
        started = time.perf_counter()
        print(f"== {name}", flush=True)
        module = importlib.import_module(f"bench.{name}")
        try:
            module.main([])
        except TypeError:
            module.main()
        print(f"== {name}: {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
