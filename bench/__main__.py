"""`python -m bench NAME [options]`: run one benchmark (see `python -m bench --help`)."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = {
    "health": "bench.health",
    "events": "bench.events",
    "burst": "bench.burst",
    "sessions": "bench.sessions",
    "audit": "bench.audit",
    "peer": "bench.peer",
    "registry": "bench.registry",
    "board": "bench.board",
    "board_moves": "bench.board_moves",
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help") or sys.argv[1] not in BENCHMARKS:
        print("usage: python -m bench {" + ",".join(BENCHMARKS) + "} [options]")
        for name, path in BENCHMARKS.items():
            doc = importlib.import_module(path).__doc__ or ""
            print(f"  {name:<8} {doc.splitlines()[0] if doc else ''}")
        return 0 if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help") else 2
    module = importlib.import_module(BENCHMARKS[sys.argv[1]])
    return int(module.main(sys.argv[2:]))


raise SystemExit(main())
