"""``make bench``: run every benchmark in its own process and print its figures.

Each benchmark prints its figure beside a baseline measured in the same run,
because these machines are shared and noisy. ``BENCH_QUICK=1 make bench`` runs each
one at a tiny size instead: a smoke test that every benchmark still works end to
end, in well under a minute (its figures mean nothing).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = sorted(p for p in HERE.glob("bench_*.py"))
QUICK_ARGS = {  # BENCH_QUICK=1: tiny sizes, to prove each benchmark runs
    "bench_audit": ["--events", "3000", "--patients", "20", "--actors", "5", "--queries", "5"],
    "bench_crypto": ["--mib", "4", "--repeat", "1"],
    "bench_inbox": ["--requests", "5", "--clients", "2", "--small", "3", "--large", "60"],
    "bench_notifier": ["--count", "20", "--repeat", "1", "--workers", "1,2", "--startup-runs", "1"],
    "bench_pickup": ["--mib", "2", "--repeat", "1"],
    "bench_upload": ["--mib", "4", "--repeat", "1"],
    "bench_serve": ["--mib", "4", "--slow-clients", "4", "--samples", "10", "--repeat", "1"],
}


def main() -> int:
    """Run each ``bench_*.py``; return non-zero if any failed (not if a target was missed)."""
    quick = os.environ.get("BENCH_QUICK") == "1"
    failed = 0
    for script in BENCHMARKS:
        print(f"\n=== {script.stem}{' (BENCH_QUICK)' if quick else ''} ===", flush=True)
        extra = QUICK_ARGS.get(script.stem, []) if quick else []
        argv = [sys.executable, str(script), *extra]
        failed += subprocess.run(argv, check=False).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
