#!/usr/bin/env bash
# Session 41, r3 (one GPU): the host-side fixes of the session's C++ review (ab97c3f..eeed787 and the ABI 16 commit):
# the host waits ask the kernel's stream for CUDA faults (every fresh dispatch and id check waits there), a failed
# count wait gives its zero-copy slot back and destroy counts only live outputs, the Buffer's own tensors on its
# stream, bounded teardown of a failed creation, size checks in the binding. First one rank on the real GPU (the
# new 1-GPU tests, then the zero-copy, stream and id-check tests), then two ranks sharing it: the new 2-rank test, the
# cycles test (no C.barrier now), the error table on the nvshmem backend, missing and late peers, peer exits, and
# the normal/low-latency round trips.
# usage: bash bench/results/2026-12-03-session41/scripts/r3.sh $OUT [name]
set -uo pipefail
source scripts/session_lib.sh "$1" "${2:-r3}"
build
tests one.log 120 test_gpu.py -k "host_wait_sees_cuda_fault or parts_on_buffer_stream or layout_id_check or fp8_native"
export LARGEEP_TEST_EMULATE_GPUS=2 LARGEEP_TEST_SHARED_GPUS=1 LARGEEP_TIMEOUT_S=5
tests new2.log 100 test_gpu.py -k "failed_count_wait or runtime_cycles or zero_copy or held_outputs or failed_copyout or failed_reduce"
tests errors.log 120 test_errors.py -k "nvshmem or destroy"
tests peers.log 150 -s test_gpu.py -k "missing_peer or late_peer or peer_exits or destroy_without_peer"
tests normal.log "$(left 560)" test_gpu.py -k "(test_normal and not four and not many and not wide) or low_latency_roundtrip or stream_edges or finished_calls"
echo "all $(elapsed) s"
finish
