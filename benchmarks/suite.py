"""Entry point of benchmarks/run: pick suites, run them, save JSON, print a markdown summary."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS, save

SUITES = {
    "extraction": "benchmarks.extraction",
    "batching": "benchmarks.batching",
    "service": "benchmarks.service",
    "fit": "benchmarks.fit_memory",
    "coldstart": "benchmarks.coldstart",
    "soak": "benchmarks.soak",
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/run", description=__doc__)
    ap.add_argument("suites", nargs="*", help=f"any of {list(SUITES)} (default: all)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small models and few repetitions (a smoke run; numbers not meaningful)",
    )
    ap.add_argument("--reps", type=int, default=None, help="repetitions per measurement")
    ap.add_argument("--results-dir", type=Path, default=RESULTS, help="where the JSON goes")
    args = ap.parse_args(argv)
    chosen = args.suites or list(SUITES)
    sections = []
    for name in chosen:
        mod = importlib.import_module(SUITES[name])
        kwargs: dict = {"quick": args.quick}
        if args.reps is not None and "reps" in mod.run.__code__.co_varnames:
            kwargs["reps"] = args.reps
        if args.quick:
            kwargs |= getattr(mod, "QUICK", {})
        t0 = time.perf_counter()
        print(f"running {name} …", file=sys.stderr, flush=True)
        res = mod.run(**kwargs)
        res["wall_s"] = round(time.perf_counter() - t0, 1)
        suffix = "-quick" if args.quick else ""
        cmd = "benchmarks/run " + name + (" --quick" if args.quick else "")
        path = save(name + suffix, res, cmd, args.results_dir)
        sections.append(mod.markdown(res) + f"\n\n_{path.name}, {res['wall_s']} s_")
    print("\n\n".join(sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
