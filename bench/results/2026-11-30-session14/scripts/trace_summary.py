"""Medians of the phase marks that a LARGEEP_TRACE build's low-latency kernels print (one line per call)."""
import re
import statistics
import sys
from collections import defaultdict

LINE = re.compile(r"^trace (\w+) rank (\d+) tokens (-?\d+) block (\d+)/(\d+) ns (\d+) cycles((?: -?\d+){9})$")
groups = defaultdict(list)
for line in open(sys.argv[1], errors="replace"):
    m = LINE.match(line.rstrip("\n"))
    if m:
        kernel, rank, tokens, _, grid, ns, cyc = m.groups()
        groups[(kernel, int(rank), int(grid), int(tokens))].append([int(ns)] + [int(v) for v in cyc.split()])
ghz = 1.98  # H200 SM clock under load (cycles -> us)
for key in sorted(groups):
    rows = groups[key]
    med = [statistics.median(col) for col in zip(*rows)]
    cols = med[1:]
    while cols and cols[-1] == 0:
        cols.pop()
    phases = " ".join(f"{c / ghz / 1000:5.2f}" for c in cols)
    print(f"{key[0]:14s} rank {key[1]} grid {key[2]:3d} tokens {key[3]:4d} n={len(rows):3d} "
          f"block wall {med[0] / 1000:6.2f} us | phases (us at {ghz} GHz): {phases}")
