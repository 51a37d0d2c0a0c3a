"""The native module's errors reach Python as exceptions with their message (no GPU needed)."""

from __future__ import annotations

import pytest
from largeep import native


def test_native_errors_are_python_exceptions() -> None:
    """A failed check inside the module raises RuntimeError naming the check and its source line (formatted without
    iostreams: a module whose toolchain linked libstdc++ statically used to crash while formatting the line)."""
    try:
        C = native.module()
    except RuntimeError as exc:
        pytest.skip(str(exc))
    with pytest.raises(RuntimeError, match=r"NVSHMEM is not initialised .*runtime\.cu:\d+\)$"):
        C.free(0, 1.0)
    with pytest.raises(RuntimeError, match=r"bad layout sizes \[num_ranks > 0 .*layout\.cu:\d+\)$"):
        C.layout(0, 1, 1, 0, 8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)
