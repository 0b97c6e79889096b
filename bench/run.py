"""``make bench``: run every benchmark in its own process and print its figures.

Each benchmark prints its figure beside a baseline measured in the same run,
because these machines are shared and noisy.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = sorted(p for p in HERE.glob("bench_*.py"))


def main() -> int:
    """Run each ``bench_*.py``; return non-zero if any failed (not if a target was missed)."""
    failed = 0
    for script in BENCHMARKS:
        print(f"\n=== {script.stem} ===", flush=True)
        failed += subprocess.run([sys.executable, str(script)], check=False).returncode != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
