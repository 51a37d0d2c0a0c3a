"""Session 36, CPU: the FP8 layers compiled with Inductor (2 gloo ranks; compiled_two_layers with num_worst_tokens 64,
2 chunks, use_fp8): not in CI (it takes about two minutes on 2 cores).
usage (repository root; copied beside tests/conftest.py, whose pools fixture it takes):
    cd tests && cp ../bench/results/2026-12-03-session36/cpu/inductor_fp8.py test_zz_inductor_fp8.py &&
    PYTHONPATH=../python python3 -m pytest -q -p no:cacheprovider test_zz_inductor_fp8.py; rm test_zz_inductor_fp8.py"""

import layer_bodies


def test_compile_two_layers_fp8_inductor(pools) -> None:
    pools(2).run(layer_bodies.compiled_two_layers, [12, 15], 64, 2, 8, "inductor", True)
