"""How fast a run pod is ready: importing the code location, side by side with what it must not load.

Each line is the median wall time of a fresh interpreter (--repeat runs) doing one thing:

  python        `pass` (the interpreter floor)
  config        import mkg_pipeline.config and load it
  definitions   import the Dagster code location and build its Definitions (what a run pod does first)
  heavy         import onnxruntime + rapidocr + mineru_vl_utils (what a careless import would add)

    python benchmarks/startup.py [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

CASES = {
    "python": "pass",
    "config": "from mkg_pipeline.config import load_config; load_config()",
    "definitions": "import mkg_pipeline; mkg_pipeline.defs.resolve_asset_graph()",
    "heavy": "import onnxruntime, rapidocr_onnxruntime, mineru_vl_utils",
}


def _time(code: str, repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, capture_output=True)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    results = {name: _time(code, args.repeat) for name, code in CASES.items()}
    for name, seconds in results.items():
        print(f"{name:12s} {seconds:6.2f} s   {seconds / results['python']:5.1f}x python")
    print(
        f"\ncode location ready in {results['definitions']:.2f} s (seed budget 5 s); "
        f"heavy model imports alone would add {results['heavy'] - results['python']:.2f} s"
    )


if __name__ == "__main__":
    main()
