"""Medians of the phase marks that the low-latency kernels print when built with the trace (one line per call).

Build: CUDAFLAGS=-DLARGEEP_TRACE LARGEEP_BUILD_NATIVE=1 pip install --no-build-isolation --no-deps .
Run:   python bench/low_latency_times.py --nprocs 2 --tokens 1,128 --iters 20 --out DIR > trace.log 2>&1
Then:  python bench/trace_summary.py trace.log [--ghz 1.98]

Each kernel's thread 0 records its SM clock at the end of each phase (csrc/kernels/launch.cuh, trace_mark), and one
block per call (the last one) prints the cycles of each phase and the block's wall time. Lines that two processes
interleaved are skipped. The printf makes the kernels slower, so the profiler times of such a build mean nothing;
the phases before the print do not pay for it. Phases, in order:
  dispatch_send: slot wait, rows taken, thread 0's vectors quantised + stored, the block's barrier after the
                 stores, puts + barrier, (put path: quiet), last block, error read, count words and rows words
  dispatch_recv: rows words and count words, prefix sums, fan-out, padding, last block, free flags
  combine_send:  slot wait, prefix sums, rows, (put path: quiet), last block, done flags
  combine_recv:  done wait, sums, last block, free flags
"""

import argparse
import re
import statistics
from collections import defaultdict

LINE = re.compile(r"^trace (\w+) rank (\d+) tokens (-?\d+) block (\d+)/(\d+) ns (\d+) cycles((?: -?\d+){9})$")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("log")
    p.add_argument("--ghz", type=float, default=1.98, help="SM clock under load, to turn cycles into us")
    args = p.parse_args()
    groups: dict[tuple[str, int, int, int], list[list[int]]] = defaultdict(list)
    with open(args.log, errors="replace") as f:
        for line in f:
            m = LINE.match(line.rstrip("\n"))
            if m:
                kernel, rank, tokens, _, grid, ns, cyc = m.groups()
                groups[(kernel, int(rank), int(grid), int(tokens))].append([int(ns)] + [int(v) for v in cyc.split()])
    for key in sorted(groups):
        rows = groups[key]
        med = [statistics.median(col) for col in zip(*rows, strict=True)]
        cols = med[1:]
        while cols and cols[-1] == 0:
            cols.pop()
        phases = " ".join(f"{c / args.ghz / 1000:5.2f}" for c in cols)
        print(f"{key[0]:14s} rank {key[1]} grid {key[2]:3d} tokens {key[3]:4d} n={len(rows):3d} "
              f"block wall {med[0] / 1000:6.2f} us | phases (us at {args.ghz} GHz): {phases}")


if __name__ == "__main__":
    main()
