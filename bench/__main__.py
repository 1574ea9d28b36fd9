"""`python -m bench NAME [options]`: run one benchmark (see `python -m bench --help`)."""

from __future__ import annotations

import sys

BENCHMARKS = {
    "health": "bench.health",
    "events": "bench.events",
    "burst": "bench.burst",
}


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help") or sys.argv[1] not in BENCHMARKS:
        print("usage: python -m bench {" + ",".join(BENCHMARKS) + "} [options]")
        for name, module in BENCHMARKS.items():
            print(f"  {name:<8} {__import__(module, fromlist=['x']).__doc__.splitlines()[0]}")
        return 0 if len(sys.argv) >= 2 and sys.argv[1] in ("-h", "--help") else 2
    module = __import__(BENCHMARKS[sys.argv[1]], fromlist=["main"])
    return int(module.main(sys.argv[2:]))


raise SystemExit(main())
