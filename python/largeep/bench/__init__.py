"""Benchmarks of largeep's dispatch and combine, and a cost model for large expert parallelism.

- ``python -m largeep.bench`` (:mod:`largeep.bench.cli`): sweep backends, modes and sizes; table, JSON and plots.
- ``python -m largeep.bench.sim`` (:mod:`largeep.bench.sim`): fit a per-leg cost model to the JSON and predict
  EP 8 to 256.
Modules: ``timing`` (timers shared by every benchmark), ``records`` (record schema, byte counts, JSON), ``routing``,
``adapters`` (one per backend), ``sweep`` (what each rank runs), ``plots``.
"""

from largeep.bench.records import RECORD_KEYS, Extra, Record, Traffic, load_records, row_bytes
from largeep.bench.timing import Stats, Timer

__all__ = ["RECORD_KEYS", "Extra", "Record", "Stats", "Timer", "Traffic", "load_records", "row_bytes"]
