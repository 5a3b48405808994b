"""`make bench`: run every benchmarks/bench_*.py in turn (each has a main())."""

from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(HERE.parent))
    selected = sys.argv[1:]
    failures = 0
    for path in sorted(HERE.glob("bench_*.py")):
        if selected and path.stem not in selected:
            continue
        print(f"== {path.stem}", flush=True)
        start = time.perf_counter()
        spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
            module.main([])
        except Exception as exc:  # keep going: one broken benchmark must not hide the others
            failures += 1
            print(f"!! {path.stem} failed: {exc!r}", flush=True)
        print(f"== {path.stem} took {time.perf_counter() - start:.1f}s", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
