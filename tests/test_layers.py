"""largeep.layers.MoELayer on 1, 2 and 4 ranks over gloo against a dense single-process float64 reference:
forward and grads, chunked overlap, replicas, low-latency mode, two-micro-batch overlap, torch.compile."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import largeep
import layer_bodies
import pytest
import torch
from largeep import layers, ops


def _tokens(world: int, base: int = 13) -> list[int]:
    # uneven counts, and a rank without tokens when there are several ranks
    return [0 if (r == 1 and world > 1) else base + 5 * r for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_layer_forward_backward(pools, world: int) -> None:
    variants = [
        {},
        {"num_chunks": 3},
        {"num_worst_tokens": 2 * 13 * world + 40},
        {"use_custom_ops": True},
        {"use_custom_ops": True, "num_worst_tokens": 2 * 13 * world + 40, "num_chunks": 2},
    ]
    pools(world).run(layer_bodies.layer_vs_reference, _tokens(world), 32, 24, 12, 4 * world, 3, 10 + world, variants)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_layer_fp8_dispatch(pools, world: int) -> None:
    """use_fp8: the routed experts compute on the tokens' FP8 round trips (dense reference, float32), the gradients
    pass through the quantisation; chunked, worst-size and custom-op variants agree."""
    variants = [
        {"use_fp8": True},
        {"use_fp8": True, "num_chunks": 3},
        {"use_fp8": True, "use_custom_ops": True, "num_worst_tokens": 2 * 13 * world + 40, "num_chunks": 2},
    ]
    pools(world).run(layer_bodies.layer_vs_reference, _tokens(world), 128, 24, 12, 4 * world, 3, 20 + world, variants,
                     0, None, True)


@pytest.mark.parametrize("world,replicas", [(1, 0), (4, 0), (2, 2)])
def test_layer_gpt_oss_experts(pools, world: int, replicas: int) -> None:
    """Experts with biases and the clamped activation (expert_mlp_bias, expert_activation=ClampedSwiGLU): output and
    every grad (the biases' too, replicas' summed) against the dense reference written out; chunked, worst-size,
    custom-op and padded-bmm (H 30) variants agree."""
    worst = 2 * 13 * world + 40
    variants = [{}, {"num_chunks": 3}, {"use_custom_ops": True, "num_worst_tokens": worst, "num_chunks": 2}]
    pools(world).run(layer_bodies.layer_vs_reference, _tokens(world), 32, 24, 12, 4 * world, 3, 40 + world, variants,
                     replicas, None, False, True)
    if world == 2:
        pools(2).run(layer_bodies.layer_vs_reference, [9, 14], 30, 18, 0, 6, 2, 5, [{}], 0, None, False, True)


@pytest.mark.parametrize("world", [1, 2])
def test_logical_experts_below_slots(pools, world: int) -> None:
    pools(world).run(layer_bodies.logical_below_slots)


@pytest.mark.parametrize("world", [2, 4])
def test_gpt_oss_slot_paths(pools, world: int) -> None:
    pools(world).run(layer_bodies.gpt_oss_slot_paths)


@pytest.mark.parametrize("world", [1, 3])
def test_layer_buffer_in_rounds(pools, world: int) -> None:
    # a Buffer that moves calls in rounds (tokens_per_round): forward and grads as without, chunked too
    variants = [{}, {"num_chunks": 2}, {"use_custom_ops": True}]
    pools(world).run(layer_bodies.layer_vs_reference, _tokens(world), 32, 24, 12, 4 * world, 3, 30 + world, variants,
                     0, 5)


@pytest.mark.parametrize("world,ranks_per_node", [(4, 2), (2, None)])
def test_layer_bf16_partial_sums(pools, world: int, ranks_per_node: int | None) -> None:
    """MoELayer(bf16_partial_sums=True): each combine, forward (one chunk, two, a pipeline) and in the backward,
    bit for bit against float32 node partials rounded to bf16; 2 nodes of 2 (where that differs from the plain
    layer) and one node (the same bits); the custom-op path and torch.compile give the eager bits."""
    pools(world).run(layer_bodies.layer_bf16_partial_sums, ranks_per_node, 61)


def test_layer_checks_placement_sizes(pools) -> None:
    pools(1).run(layer_bodies.layer_checks_placement_sizes)


def test_layer_checks_nodes_and_ll_chunks(pools) -> None:
    pools(2).run(layer_bodies.layer_checks_nodes_and_ll_chunks)


@pytest.mark.parametrize("world", [1, 2])
def test_pipeline_aux_losses(pools, world: int) -> None:
    pools(world).run(layer_bodies.pipeline_aux_losses)


@pytest.mark.parametrize("world", [1, 2])
def test_interleaved_refusals(pools, world: int) -> None:
    pools(world).run(layer_bodies.interleaved_refusals)


@pytest.mark.parametrize("world", [1, 2])
def test_error_frees_custom_op_handles(pools, world: int) -> None:
    pools(world).run(layer_bodies.error_frees_custom_op_handles)


@pytest.mark.parametrize("world", [2, 3])
def test_replicas_start_equal(pools, world: int) -> None:
    pools(world).run(layer_bodies.replicas_start_equal)


@pytest.mark.parametrize("world", [1, 2])
def test_layer_saves_slot_layout(pools, world: int) -> None:
    pools(world).run(layer_bodies.layer_saves_slot_layout)


@pytest.mark.parametrize("world", [2, 4])
def test_layer_global_experts(pools, world: int) -> None:
    pools(world).run(layer_bodies.layer_global_experts)


def test_checkpoint_at_another_ep_size(pools) -> None:
    """docs/usage.md's checkpoint example: EP 4 saved after an AdamW step (rank 0, CPU), EP 2 loads it and its
    second step equals EP 4's."""
    pools(4).run(layer_bodies.checkpoint_at_another_ep_size)


@pytest.mark.parametrize("world", [1, 4])
def test_layer_global_experts_lean(pools, world: int) -> None:
    """gather_global_experts(dst=, device=): the default gather's tensors on dst only / on the CPU, refusals on
    every rank; expert TP on 4 ranks."""
    pools(world).run(layer_bodies.layer_global_experts_lean)


@pytest.mark.gpu(2)
@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.gpu(4, real=True))])
def test_layer_global_experts_lean_gpu(pools, world: int) -> None:
    """The same with CUDA weights on an NCCL group (point to point, broadcasts and TP gathers of CUDA tensors,
    assembled on the weights' GPU or copied to the CPU): one GPU per rank; 4 GPUs add expert TP 2 x EP 2. Two
    ranks sharing a GPU (emulation) run it on a gloo group, with CUDA tensors."""
    pools(world, "nccl").run(layer_bodies.layer_global_experts_lean, "cuda")


def test_layer_replace_experts(pools) -> None:
    """The step after moving to a plan from measured loads (weights, AdamW moments, gate) equals the unmoved layer's."""
    pools(4).run(layer_bodies.layer_replace_experts)


def test_layer_set_placement(pools) -> None:
    """MoELayer.set_placement moves the experts (and AdamW's moments) in place: the step after it (one chunk and
    two, to a plan, from and back to no placement) equals the unmoved layer's; refusals on every rank."""
    pools(4).run(layer_bodies.layer_set_placement)


def test_layer_set_placement_state(pools) -> None:
    """set_placement moves Adafactor's per-slot factored moments, refuses state neither scalar nor per slot, and
    experts.reset_parameters() after it draws the new plan's weights."""
    pools(2).run(layer_bodies.layer_set_placement_state)


# LARGEEP_TEST_ROUNDS (tests/test_long_run.py's convention) widens the random sweep: that many seeds per world
RANDOM_PLACEMENTS = int(os.environ.get("LARGEEP_TEST_ROUNDS", "0")) or None


@pytest.mark.parametrize("world,tp_size,seeds", [(2, 1, 30), (4, 1, 20), (4, 2, 10)])
def test_layer_set_placement_random(pools, world: int, tp_size: int, seeds: int) -> None:
    """set_placement (AdamW state) and gather_global_experts (random dst, device None / "cpu") on random placements
    (layer_bodies.random_table: replicas, empty slots, several replicas on one rank, ranks rotated, the identity),
    chains old -> a -> b -> old against the group's per-slot tensors moved slot by slot; expert TP 2 on 4 ranks.
    A fixed list of seeds (every rank draws the same cases from each); LARGEEP_TEST_ROUNDS=N runs N per world."""
    n = RANDOM_PLACEMENTS or seeds
    first = 1000 * world + 100 * tp_size
    results = pools(world).run(layer_bodies.layer_set_placement_random, list(range(first, first + n)), tp_size)
    for rank, res in enumerate(results):
        assert not res["failures"], "\n".join(res["failures"])
        assert (res["cases"], res["moves"]) == (n, 3 * n), f"rank {rank}: {res}"
        assert res["gathers"] == 3 * n and 0 < res["forwards"] <= n, f"rank {rank}: {res}"


@pytest.mark.gpu(2)
def test_layer_set_placement_gpu(pools) -> None:
    """The same on CUDA with the nvshmem backend (2 ranks: the all-to-all of slots over NCCL)."""
    from largeep import native

    if native.unavailable_reason() is not None:
        pytest.skip(str(native.unavailable_reason()))
    pools(2, "nccl").run(layer_bodies.layer_set_placement, "nvshmem")


def test_layer_refuses_num_worst_tokens_with_rounds(pools) -> None:
    pools(1).run(layer_bodies.layer_refuses_worst_with_rounds)


def test_layer_padded_bmm_sizes(pools) -> None:
    # hidden and ffn sizes whose strides are not multiples of 16 bytes: the padded-bmm grouped GEMM
    pools(2).run(layer_bodies.layer_vs_reference, [9, 14], 30, 18, 0, 6, 2, 5, [{}, {"num_chunks": 2}])


@pytest.mark.parametrize("world", [2, 4])
def test_layer_replicas(pools, world: int) -> None:
    # E physical slots, E - 2 logical experts: two of them have two replicas whose grads are summed
    pools(world).run(
        layer_bodies.layer_vs_reference, _tokens(world), 32, 16, 8, 4 * world, 2, 20 + world, [{}], 2
    )


@pytest.mark.parametrize("world", [2, 3])
def test_replica_grads_with_empty_slots(pools, world: int) -> None:
    # empty slots (-1) beside a replicated highest logical expert: summed per expert against a float64 loop
    pools(world).run(layer_bodies.replica_grads_with_empty_slots)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_low_latency_vs_normal(pools, world: int) -> None:
    tokens = [min(8, 4 + 2 * r) for r in range(world)]
    pools(world).run(layer_bodies.low_latency_vs_normal, tokens, 32, 16, 8, 4 * world, 3, 30 + world, False)


def test_low_latency_fp8(pools) -> None:
    pools(2).run(layer_bodies.low_latency_vs_normal, [6, 5], 256, 32, 0, 8, 2, 41, True)


@pytest.mark.parametrize("use_fp8", [False, True])
def test_low_latency_gpt_oss_experts(pools, use_fp8: bool) -> None:
    # experts with biases and the clamped activation in the decode path (slots' rows, invalid ones zero); with FP8
    # no shared experts (the reference feeds the FP8 round trip to the whole normal layer)
    pools(2).run(layer_bodies.low_latency_vs_normal, [6, 5], 128, 16, 0 if use_fp8 else 8, 8, 3, 43, use_fp8, True)


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("num_worst,num_chunks", [(0, 1), (64, 2)])
def test_compile_two_layers(pools, world: int, num_worst: int, num_chunks: int) -> None:
    pools(world).run(layer_bodies.compiled_two_layers, [12 + 3 * r for r in range(world)], num_worst, num_chunks, 7)


@pytest.mark.parametrize("num_worst,num_chunks", [(0, 1), (64, 2)])
def test_compile_two_layers_fp8(pools, num_worst: int, num_chunks: int) -> None:
    """The FP8 dispatch compiles as the bf16 one: the same graph checks, use_fp8 on both layers."""
    pools(2).run(layer_bodies.compiled_two_layers, [12, 15], num_worst, num_chunks, 8, "aot_eager", True)


@pytest.mark.parametrize("custom", [False, True])
def test_chunks_freed_in_forward(pools, custom: bool) -> None:
    """A chunked forward under autograd drops each chunk's received outputs before the chunk two later is sent."""
    pools(2).run(layer_bodies.chunks_freed_in_forward, custom)


@pytest.mark.parametrize("custom", [False, True])
@pytest.mark.parametrize("one_buffer", [False, True])
def test_pipeline_chunks_freed(pools, custom: bool, one_buffer: bool) -> None:
    """MoEPipeline, 2 layers x 3 chunks under autograd: at each dispatch only the previous unit's outputs live."""
    pools(2).run(layer_bodies.pipeline_chunks_freed, custom, one_buffer)


@pytest.mark.parametrize(("custom", "tp", "fp8"), [(c, tp, fp8) for c in (False, True) for tp, fp8 in
                                                   ((1, False), (2, False), (1, True))])
def test_layer_chunks_freed(pools, custom: bool, tp: int, fp8: bool) -> None:
    """A chunked layer with shared experts, whole or expert TP, FP8 or not: at each dispatch only the previous
    chunk's received outputs live."""
    pools(2).run(layer_bodies.layer_chunks_freed, custom, tp, fp8)


@pytest.mark.parametrize("pipeline", [False, True])
def test_checkpointed_chunks_held(pools, pipeline: bool) -> None:
    """checkpoint(layer or pipeline, context_fn=ops.checkpoint_context_fn) on the custom-op path: the recomputation
    stopping inside the forward releases nothing; each dispatch's received memory is saved until the backward."""
    pools(2).run(layer_bodies.checkpointed_chunks_held, pipeline)


def test_two_batch_freed(pools) -> None:
    """TwoBatchOverlap drops A's received rows once A's combine is sent, before B's experts."""
    pools(2).run(layer_bodies.two_batch_freed)


def test_compile_dynamic_chunked(pools) -> None:
    """torch.compile(dynamic=True) of a chunked layer over 7 batch sizes: equal to eager, at most 3 graphs."""
    counts = [[4, 7], [5, 0], [6, 9], [7, 1], [0, 4], [9, 12], [1, 5]]
    pools(2).run(layer_bodies.compiled_dynamic_chunked, counts)


def test_placement_compiled(pools) -> None:
    """A layer with a Placement compiles with fullgraph (its table route) and equals eager."""
    pools(2).run(layer_bodies.placement_compiled, [12, 9], 5)


def test_compile_two_layers_inductor(pools) -> None:
    """The same with Inductor (torch.compile's default backend), chunked, ranks of different token counts, with the
    count exchange (received sizes known only at run time; test_pipeline_compiled compiles num_worst_tokens layers
    with Inductor)."""
    pools(2).run(layer_bodies.compiled_two_layers, [12, 15], 0, 2, 7, "inductor")


@pytest.mark.parametrize("backend,num_worst", [("aot_eager", 40), ("inductor", 0)])
def test_compiled_gpt_oss_experts(pools, backend: str, num_worst: int) -> None:
    # experts with biases and the clamped activation compile (no graph break with num_worst_tokens) and equal eager
    pools(2).run(layer_bodies.compiled_two_layers, [12, 15], num_worst, 2, 9, backend, False, True)


@pytest.mark.skipif(importlib.util.find_spec("largeep.gate") is None, reason="largeep.gate is not there")
def test_layer_with_topk_gate(pools) -> None:
    pools(2).run(layer_bodies.layer_with_topk_gate, [10, 7], 3)


def test_inference_mode(pools) -> None:
    """Prefill under torch.inference_mode: the normal-mode layer, its chunks, the pipeline and the ops equal no_grad
    (the eager dispatch read a version counter that inference tensors lack)."""
    pools(2).run(layer_bodies.inference_mode_matches_no_grad, [6, 5])


def test_layer_size_checks(pools) -> None:
    pools(1).run(layer_bodies.layer_size_checks)


@pytest.mark.parametrize("world", [1, 2])
def test_layer_input_checks(pools, world: int) -> None:
    """x of a dtype or shape the layer cannot take, global expert weights of the wrong shape, MoEPipeline's
    num_chunks not an int: ArgumentError naming them, on every rank, in either mode."""
    pools(world).run(layer_bodies.layer_input_checks)


def test_deepcopy_of_a_model(pools) -> None:
    pools(1).run(layer_bodies.deepcopy_of_a_model)


def test_repeated_expert_gate(pools) -> None:
    pools(2).run(layer_bodies.repeated_expert_gate)


def test_merging_placement(pools) -> None:
    pools(2).run(layer_bodies.merging_placement)


def _rows_case(case: str, rows: int, topk: int, experts: int, g: torch.Generator) -> torch.Tensor:
    """Local expert ids [rows, K] (-1: not here), no expert twice in a row; rows 0 and 3 name no local expert."""
    if case == "empty":
        return torch.empty(0, topk, dtype=torch.int64)
    idx = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(rows)])
    if case == "all_valid":
        return idx
    if case == "none_valid":
        return torch.full_like(idx, -1)
    idx = torch.where(torch.rand(rows, topk, generator=g) < 0.4, -1, idx)
    idx[0] = -1
    idx[3] = -1
    return idx


def _dense_rows64(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, w1: torch.Tensor, w3: torch.Tensor,
                  w2: torch.Tensor, biases: tuple[torch.Tensor, ...] | None = None, activation: Any = "silu",
                  ) -> torch.Tensor:
    """The dense reference in float64 (inputs float64 on the CPU): ``y[r] = sum_k w[r, k] * expert_{idx[r, k]}(x[r])``
    over the entries >= 0, one entry at a time; differentiable in every input. ``biases``: (b1, b3, b2) of experts
    with biases, ``activation`` theirs (layer_bodies._act)."""
    y = torch.zeros(x.shape, dtype=torch.float64)
    for i, k in (idx >= 0).nonzero().tolist():
        e = int(idx[i, k])
        if biases is None:
            out = layer_bodies._act(x[i] @ w1[e], x[i] @ w3[e], activation) @ w2[e]
        else:
            out = layer_bodies._act(x[i] @ w1[e] + biases[0][e], x[i] @ w3[e] + biases[1][e], activation) @ w2[e] \
                + biases[2][e]
        y = y.index_add(0, torch.tensor([i]), (w[i, k] * out).unsqueeze(0))
    return y


def _rows_reference(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, ex: layers.GroupedExperts) -> torch.Tensor:
    w1, w3, w2 = (p.detach().double().cpu() for p in (ex.w1, ex.w3, ex.w2))
    return _dense_rows64(x.double(), idx, w.double(), w1, w3, w2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden,ffn", [(32, 16), (30, 18)])  # native grouped GEMM, padded bmm
@pytest.mark.parametrize("case", ["mixed", "all_valid", "none_valid", "empty"])
@pytest.mark.parametrize("known", [True, False])
def test_forward_rows(one_thread, dtype: torch.dtype, hidden: int, ffn: int, case: str, known: bool) -> None:
    """GroupedExperts.forward_rows against a float64 loop, with and without the host-known pair count: outputs,
    grads of x, the weights and the expert parameters. Rows naming no local expert hold NaN (a worst-size
    dispatch leaves them unspecified): they must give zero output and zero grad, and poison nothing else."""
    torch.manual_seed(7)
    g = torch.Generator().manual_seed(hidden * 100 + len(case) * 2 + known)
    experts, topk, rows = 5, 3, 9
    ex = layers.GroupedExperts(experts, hidden, ffn, dtype=dtype)
    idx = _rows_case(case, rows, topk, experts, g)
    r = idx.shape[0]
    x = torch.randn(r, hidden, generator=g)
    none_here = (idx < 0).all(dim=1)
    x[none_here] = float("nan")
    x = x.to(dtype).requires_grad_()
    w = torch.rand(r, topk, generator=g).requires_grad_()
    pairs = int((idx >= 0).sum()) if known else None
    ops.reset_grouped_mm_stats()
    y = ex.forward_rows(x, idx, w, pairs)
    backend = ops.grouped_mm_backend(torch.empty(2, hidden, dtype=dtype), ex.w13)
    assert backend == ("native" if hidden == 32 else "padded_bmm"), (backend, ops._native_failed)
    ran = {name.split(" ")[0] for name in ops.grouped_mm_stats()}
    assert ran == {backend} or (r == 0 and ran <= {backend, "padded_bmm"}), ops.grouped_mm_stats()
    assert y.dtype == dtype and y.shape == (r, hidden)
    x_ref = torch.where(none_here.unsqueeze(1), 0.0, x.detach().float())
    want = _rows_reference(x_ref, idx, w.detach(), ex)
    rtol = 1e-5 if dtype == torch.float32 else 2.0**-6
    layer_bodies.close(y, want, f"forward_rows {case}", rtol=rtol)
    assert (y[none_here] == 0).all()
    cot = torch.randn(r, hidden, generator=g).to(dtype)
    (y.float() * cot.float()).sum().backward()
    x64 = x_ref.double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    params = [p.detach().double().requires_grad_() for p in (ex.w1, ex.w3, ex.w2)]
    # (0 * the sums: every leaf gets a gradient, zero where no entry names it)
    y64 = 0 * (x64.sum() + w64.sum() + sum(p.sum() for p in params)) + _dense_rows64(x64, idx, w64, *params)
    (y64 * cot.double()).sum().backward()
    assert x.grad is not None and w.grad is not None
    assert (x.grad[none_here] == 0).all() and (w.grad[none_here] == 0).all()
    layer_bodies.close(x.grad, x64.grad, "grad of x", rtol=rtol * 4)
    layer_bodies.close(w.grad, w64.grad, "grad of topk_weights", rtol=rtol * 4)
    for p64, name in zip(params, ("w1", "w3", "w2"), strict=True):
        layer_bodies.close(layer_bodies.expert_grad(ex, name), p64.grad, f"grad of {name}", rtol=rtol * 4)


def _poison_tails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every grouped GEMM output (forward and backward) gets NaN in its rows past offs[-1], and every gather in its
    rows at or past the count: what the native kernels may leave there (they do not write those rows)."""
    real_mm, real_gather = torch._grouped_mm, ops._gather_rows_impl

    def mm(a: torch.Tensor, b: torch.Tensor, *args, offs=None, **kw) -> torch.Tensor:
        out = real_mm(a, b, *args, offs=offs, **kw)
        if offs is not None and out.dim() == 2 and b.dim() == 3:
            out.masked_fill_((torch.arange(out.shape[0], device=out.device) >= offs[-1]).unsqueeze(1), float("nan"))
        return out

    def gather(x: torch.Tensor, src: torch.Tensor, count: torch.Tensor, pos=None, num_blocks: int = 0) -> torch.Tensor:
        out = real_gather(x, src, count, pos, num_blocks)
        out.masked_fill_((torch.arange(out.shape[0], device=out.device) >= count).unsqueeze(1), float("nan"))
        return out

    monkeypatch.setattr(torch, "_grouped_mm", mm)
    monkeypatch.setattr(ops, "_gather_rows_impl", gather)


def _unknown_vs_known_pairs(device: str, dtype: torch.dtype, hidden: int, ffn: int, rows: int, topk: int,
                            experts: int, seed: int, case: str = "mixed", gpt_oss: bool = False) -> str:
    """forward_rows with num_pairs=None against the same call with the right num_pairs and against a float64 loop:
    output, grads of x, of the weights and of w13 / w2 (and b13 / b2: ``gpt_oss``, experts with random biases and
    the clamped activation). NaN in the rows of x and the weights that no valid entry names. Returns the grouped
    GEMM backends that ran."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    act = layer_bodies.GPT_OSS_TEST_ACTIVATION if gpt_oss else "silu"
    ex = layers.GroupedExperts(experts, hidden, ffn, dtype=dtype, bias=gpt_oss, activation=act).to(device)
    if gpt_oss:
        with torch.no_grad():
            for b in (ex.b13, ex.b2):
                b.copy_(torch.randn(b.shape, generator=g) * 0.5)
    idx = _rows_case(case, rows, topk, experts, g)
    r = idx.shape[0]
    none_here = (idx < 0).all(dim=1)
    x = torch.randn(r, hidden, generator=g)
    x[none_here] = float("nan")
    w = torch.where(idx >= 0, torch.rand(r, topk, generator=g), float("nan"))
    cot = torch.randn(r, hidden, generator=g).to(dtype)
    pairs = int((idx >= 0).sum())
    got = {}
    ops.reset_grouped_mm_stats()
    for known in (True, False):
        ex.zero_grad(set_to_none=True)
        xg = x.to(dtype).to(device).clone().requires_grad_()
        wg = w.to(device).clone().requires_grad_()
        y = ex.forward_rows(xg, idx.to(device), wg, pairs if known else None)
        assert y.dtype == dtype and y.shape == (r, hidden)
        (y.float() * cot.to(device).float()).sum().backward()
        got[known] = {"y": y.detach(), "grad of x": xg.grad, "grad of topk_weights": wg.grad,
                      "grad of w13": ex.w13.grad, "grad of w2": ex.w2.grad}
        if gpt_oss:
            got[known].update({"grad of b13": ex.b13.grad, "grad of b2": ex.b2.grad})
    rtol = 1e-5 if dtype == torch.float32 else 2.0**-6
    for name, t in got[False].items():
        assert torch.isfinite(t).all(), f"{name}: non-finite values with num_pairs=None"
        layer_bodies.close(t, got[True][name], f"{name}: num_pairs None vs known", rtol=rtol)
    assert (got[False]["y"][none_here.to(device)] == 0).all()
    assert (got[False]["grad of x"][none_here.to(device)] == 0).all()
    # the dense reference (float64 autograd over the valid entries only)
    x_ref = torch.where(none_here.unsqueeze(1), 0.0, x.to(dtype).float())
    w_ref = torch.where(idx >= 0, w, 0.0)
    x64 = x_ref.double().requires_grad_()
    w64 = w_ref.double().requires_grad_()
    w1, w3, w2 = (p.detach().double().cpu().requires_grad_() for p in (ex.w1, ex.w3, ex.w2))
    b64 = tuple(p.detach().double().cpu().requires_grad_() for p in (ex.b1, ex.b3, ex.b2)) if gpt_oss else None
    y64 = _dense_rows64(x64, idx, w64, w1, w3, w2, b64, act).requires_grad_(True)
    (y64 * cot.double()).sum().backward()
    layer_bodies.close(got[False]["y"], y64, "y against the dense reference", rtol=rtol)
    if pairs:
        layer_bodies.close(got[False]["grad of x"], x64.grad, "grad of x against the reference", rtol=4 * rtol)
        layer_bodies.close(got[False]["grad of topk_weights"], w64.grad, "grad of w against the reference",
                           rtol=4 * rtol)
        g13 = torch.cat([w1.grad, w3.grad], dim=2)
        layer_bodies.close(got[False]["grad of w13"], g13, "grad of w13 against the reference", rtol=4 * rtol)
        layer_bodies.close(got[False]["grad of w2"], w2.grad, "grad of w2 against the reference", rtol=4 * rtol)
        if b64 is not None:
            gb13 = torch.cat([b64[0].grad, b64[1].grad], dim=1)
            layer_bodies.close(got[False]["grad of b13"], gb13, "grad of b13 against the reference", rtol=4 * rtol)
            layer_bodies.close(got[False]["grad of b2"], b64[2].grad, "grad of b2 against the reference",
                               rtol=4 * rtol)
    return " ".join(sorted({name.split(" ")[0] for name in ops.grouped_mm_stats()}))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["mixed", "all_valid", "none_valid", "empty"])
@pytest.mark.parametrize("poison", [False, True])
@pytest.mark.parametrize("gpt_oss", [False, True])
def test_forward_rows_unknown_pairs(one_thread, monkeypatch, dtype: torch.dtype, case: str, poison: bool,
                                    gpt_oss: bool) -> None:
    """CPU: num_pairs=None (gather, GEMMs and weighted sum stopping at offs[-1], no tail cleared) equals the
    host-known count and the dense reference, forward and backward, also with NaN planted in every GEMM output's
    and the gather's rows past offs[-1] (what the native kernels may leave there); experts with biases and the
    clamped activation too (the biases' rows past offs[-1] take nothing, and their grads no NaN)."""
    if poison:
        _poison_tails(monkeypatch)
    ran = _unknown_vs_known_pairs("cpu", dtype, 32, 16, 11, 3, 5, 3 + len(case), case, gpt_oss)
    assert ran in ("native", "native padded_bmm", "padded_bmm"), ran


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["mixed", "all_valid", "none_valid"])
def test_forward_rows_known_pairs_without_x_grad(one_thread, monkeypatch, dtype: torch.dtype, case: str) -> None:
    """With the pair count known and no gradient for x (inference, or x not requiring one), the GEMMs leave their
    pad row unwritten (no tail clearing): NaN planted there reaches neither the output nor the weights' gradients,
    which equal the path that clears it."""
    torch.manual_seed(5)
    g = torch.Generator().manual_seed(11 + len(case))
    ex = layers.GroupedExperts(5, 32, 16, dtype=dtype)
    idx = _rows_case(case, 9, 3, 5, g)
    r = idx.shape[0]
    x = torch.randn(r, 32, generator=g).to(dtype)
    w = torch.rand(r, 3, generator=g)
    pairs = int((idx >= 0).sum())
    cot = torch.randn(r, 32, generator=g)
    want = ex.forward_rows(x.clone().requires_grad_(), idx, w, pairs)
    (want.float() * cot).sum().backward()
    want_grads = [p.grad.clone() for p in (ex.w13, ex.w2)]
    ex.zero_grad(set_to_none=True)
    _poison_tails(monkeypatch)
    cleared = []
    real_clear = ops._clear_tail
    monkeypatch.setattr(ops, "_clear_tail", lambda *a: cleared.append(1) or real_clear(*a))
    with torch.no_grad():
        got = ex.forward_rows(x, idx, w, pairs)
    assert not cleared
    layer_bodies.close(got, want.detach(), f"no_grad forward_rows {case}", rtol=0.0)
    got = ex.forward_rows(x, idx, w, pairs)  # x needs no gradient, the expert weights do
    assert not cleared
    assert torch.isfinite(got).all()
    (got.float() * cot).sum().backward()
    for p, want_g, name in zip((ex.w13, ex.w2), want_grads, ("w13", "w2"), strict=True):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        layer_bodies.close(p.grad, want_g, f"grad of {name}", rtol=0.0)


@pytest.mark.gpu(1)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("poison", [False, True])
@pytest.mark.parametrize("gpt_oss", [False, True])
def test_forward_rows_unknown_pairs_gpu(monkeypatch, dtype: torch.dtype, poison: bool, gpt_oss: bool) -> None:
    """CUDA (native order, gather and weighted sum; torch._grouped_mm for bf16 on sm90/sm100, the padded bmm for
    float32): num_pairs=None equals the known count and the dense reference, forward and backward, with NaN in the
    rows of x and the weights that name no local expert and (poison) in the GEMM outputs' and the gather's rows
    past offs[-1]."""
    from largeep import native

    if native.unavailable_reason() is not None:
        pytest.skip(str(native.unavailable_reason()))
    if poison:
        _poison_tails(monkeypatch)
    ran = _unknown_vs_known_pairs("cuda", dtype, 128, 64, 70, 4, 6, 11, "mixed", gpt_oss)
    if dtype == torch.bfloat16 and torch.cuda.get_device_capability()[0] in (9, 10):
        assert ran == "native", ran


@pytest.mark.gpu(1)
def test_forward_rows_unknown_pairs_cuda_graph() -> None:
    """forward_rows with num_pairs=None (bf16) waits on nothing on the host: it captures in a CUDA graph, and
    replays on fresh rows and ids (with NaN in the rows naming no local expert) equal the eager call."""
    from largeep import native

    if native.unavailable_reason() is not None:
        pytest.skip(str(native.unavailable_reason()))
    torch.manual_seed(2)
    r, k, e, h, f = 96, 4, 8, 256, 64
    ex = layers.GroupedExperts(e, h, f, dtype=torch.bfloat16).cuda()

    def fresh(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        idx = _rows_case("mixed", r, k, e, g)
        x = torch.randn(r, h, generator=g)
        x[(idx < 0).all(dim=1)] = float("nan")
        return x.to(torch.bfloat16).cuda(), idx.cuda(), torch.rand(r, k, generator=g).cuda()

    static = fresh(0)
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                ex.forward_rows(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_static = ex.forward_rows(*static)
        for seed in range(1, 6):
            new = fresh(seed)
            for dst, src in zip(static, new, strict=True):
                dst.copy_(src)
            graph.replay()
            want = ex.forward_rows(*new)
            torch.cuda.synchronize()
            assert torch.isfinite(y_static).all()
            assert torch.equal(y_static, want), seed


@pytest.mark.parametrize("world", [pytest.param(1, marks=pytest.mark.gpu(1)),
                                   pytest.param(2, marks=pytest.mark.gpu(2))])
@pytest.mark.parametrize("backend", ["nvshmem", "torch"])
def test_gpt_oss_layer_gpu(pools, world: int, backend: str) -> None:
    from largeep import native

    if backend == "nvshmem" and native.unavailable_reason() is not None:
        pytest.skip(str(native.unavailable_reason()))
    pools(world, "nccl").run(layer_bodies.gpt_oss_layer_gpu, backend)


@pytest.mark.gpu(2)
@pytest.mark.parametrize("backend", ["nvshmem", "torch"])
@pytest.mark.parametrize("use_fp8", [False, True])
def test_layer_chunked_gpu(pools, backend: str, use_fp8: bool) -> None:
    from largeep import native

    if backend == "nvshmem" and native.unavailable_reason() is not None:
        pytest.skip(str(native.unavailable_reason()))
    pools(2, "nccl").run(layer_bodies.layer_chunked_gpu, backend, [700, 0], use_fp8)


@pytest.mark.gpu(1)
def test_layer_unaligned_chunks_gpu(pools) -> None:
    pools(1, "nccl").run(layer_bodies.layer_unaligned_chunks_gpu)


@pytest.mark.gpu(2)
@pytest.mark.parametrize("backend", ["nvshmem", "torch"])
def test_layer_strided_input_gpu(pools, backend: str) -> None:
    from largeep import native

    if backend == "nvshmem" and native.unavailable_reason() is not None:
        pytest.skip(str(native.unavailable_reason()))
    pools(2, "nccl").run(layer_bodies.layer_strided_input_gpu, backend, [600, 37])


@pytest.mark.gpu(2)
@pytest.mark.parametrize("with_placement", [False, True], ids=["plain", "placement"])
@pytest.mark.parametrize("use_fp8", [True, False], ids=["fp8", "bf16"])
def test_decode_step_cuda_graph(pools, with_placement: bool, use_fp8: bool) -> None:
    """The low-latency MoE decode step captured in a CUDA graph and replayed 20 times on fresh inputs equals eager
    (with a placement: its table route in the graph, to bf16 rounding), dispatching FP8 or bf16."""
    from largeep import native

    if native.unavailable_reason() is not None:
        pytest.skip(str(native.unavailable_reason()))
    res = pools(2, "nccl").run(layer_bodies.decode_step_cuda_graph, 16, 20, with_placement, use_fp8)
    assert all(r["replays"] == 20 and r["mismatches"] == 0 for r in res), res


@pytest.mark.parametrize("world", [2, 4])
def test_pipeline_vs_sequential(pools, world: int) -> None:
    # 3 layers, residual + RMSNorm between; chunks 1/2/3 over uneven token counts and a rank without tokens
    pools(world).run(
        layer_bodies.pipeline_vs_sequential, _tokens(world), 32, 24, 12, 4 * world, 3, 50 + world, [1, 2, 3], {},
        False,
    )


@pytest.mark.gpu(2)
@pytest.mark.parametrize("custom", [False, True], ids=["eager", "custom_ops"])
@pytest.mark.parametrize("backend", ["nvshmem", "torch"])
def test_pipeline_gpu(pools, backend: str, custom: bool) -> None:
    # on CUDA: the pipeline's side stream beside the Buffers' streams and the experts (float32 layers, shared
    # experts, 3 layers, 2 Buffers, uneven tokens) against the sequential layers and the dense reference; with
    # the custom-op path (no events: everything stays on the caller's stream)
    from largeep import native

    if backend == "nvshmem" and native.unavailable_reason() is not None:
        pytest.skip(str(native.unavailable_reason()))
    kw = {"use_custom_ops": True} if custom else {}
    pools(2, "nccl").run(
        layer_bodies.pipeline_vs_sequential, [300, 77], 256, 64, 32, 16, 3, 71, [1, 2, 3, 4], kw, False, backend
    )


def test_pipeline_fp8(pools) -> None:
    """Layers that dispatch FP8 in a pipeline: against the sequential layers and the dense reference whose routed
    experts see FP8 round trips (hidden 128)."""
    pools(2).run(layer_bodies.pipeline_vs_sequential, [13, 5], 128, 16, 8, 8, 2, 63, [2, 3], {"use_fp8": True},
                 False)


def test_pipeline_options(pools) -> None:
    # worst-size dispatch on the custom-op path, no shared experts, a between after the last layer too
    kw = {"use_custom_ops": True, "num_worst_tokens": 2 * 13 * 2 + 40}
    pools(2).run(layer_bodies.pipeline_vs_sequential, [13, 5], 32, 16, 0, 8, 2, 61, [2, 3], kw, True)


# (Inductor once, with num_worst_tokens: test_compile_two_layers_inductor compiles chunked layers of the count
# exchange with it; each Inductor case costs 10-25 s of C++ compiles on a 2-core machine)
@pytest.mark.parametrize("num_worst,backend", [(0, "aot_eager"), (64, "aot_eager"), (64, "inductor")])
def test_pipeline_compiled(pools, num_worst: int, backend: str) -> None:
    pools(2).run(layer_bodies.pipeline_compiled, [12, 9], num_worst, 9, backend)


def test_pipeline_errors(pools) -> None:
    pools(2).run(layer_bodies.pipeline_errors)


@pytest.mark.parametrize("native", [True, False])
def test_layer_id_checks(pools, native: bool) -> None:
    # native: no Python id check at all (each dispatch's verdict travels with its count exchange); else one per
    # dispatch (a MoEPipeline of 2 layers in 2 chunks: 4)
    for res in pools(2).run(layer_bodies.layer_id_checks, native):
        assert res == ({1: 0, 3: 0, "pipeline": 0} if native else {1: 1, 3: 3, "pipeline": 4}), res


def test_grouped_experts_w13_views_and_old_state_dict() -> None:
    # w1 / w3 are w13's halves; a state dict of the earlier layout (separate w1, w3) loads into w13
    ex = layers.GroupedExperts(3, 16, 8)
    assert ex.w1.shape == ex.w3.shape == (3, 16, 8)
    assert torch.equal(torch.cat([ex.w1, ex.w3], dim=2), ex.w13)
    with torch.no_grad():
        ex.w3.fill_(2.0)
    assert (ex.w13[:, :, 8:] == 2.0).all() and not (ex.w13[:, :, :8] == 2.0).all()
    w1, w3, w2 = torch.randn(3, 16, 8), torch.randn(3, 16, 8), torch.randn(3, 8, 16)
    other = layers.GroupedExperts(3, 16, 8)
    other.load_state_dict({"w1": w1, "w3": w3, "w2": w2})
    assert torch.equal(other.w1, w1) and torch.equal(other.w3, w3) and torch.equal(other.w2, w2)
    assert set(other.state_dict()) == {"w13", "w2"}
    other.load_state_dict(ex.state_dict())
    assert torch.equal(other.w13, ex.w13)
    # the views are no parameters: their .grad stays None, so the replica all-reduce refuses them
    assert [n for n, _ in ex.named_parameters()] == ["w13", "w2"]
    with pytest.raises(largeep.ArgumentError, match="not a leaf"):
        layers.allreduce_replica_grads([ex.w1, ex.w3, ex.w2], torch.arange(3))
    # a parameter of another row count is named (the message quoted params[0]'s rows)
    with pytest.raises(largeep.ArgumentError, match=r"params\[1\] has 4 rows, params\[0\] 3"):
        layers.allreduce_replica_grads([ex.w13, torch.nn.Parameter(torch.zeros(4, 2))], torch.arange(3))


def test_linear_router_top1_warns() -> None:
    """LinearTopKRouter with topk=1 and normalised weights warns as GateConfig does (every weight 1: the router
    learns nothing from the task loss); not without normalisation."""
    import warnings

    with pytest.warns(UserWarning, match="no gradient"):
        layers.LinearTopKRouter(8, 4, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layers.LinearTopKRouter(8, 4, 1, norm_topk_prob=False)
        layers.LinearTopKRouter(8, 4, 2)


def test_ops_zero_rows_backward(pools) -> None:
    pools(1).run(layer_bodies.ops_zero_rows_backward)


def test_ops_registry_finalizer_never_waits_for_the_lock() -> None:
    """A Buffer's finalizer may run (garbage collection) in a thread that holds the ops registry's lock: it must
    not wait for it (that deadlocked), and the dead Buffer's entries go at the next locked call."""
    import gc
    import threading
    from collections import OrderedDict

    from largeep import ops

    bid = -12345  # (no real Buffer has a negative id)
    done = threading.Event()

    def finalize_inside_lock() -> None:
        with ops._REG.lock:
            ops._forget_buffer(bid)  # as the garbage collector would call it here
        done.set()

    gc.disable()  # (a collection meanwhile could finalize an earlier test's dead Buffer and drain early)
    try:
        with ops._locked():
            ops._REG.entries[bid], ops._REG.limits[bid] = OrderedDict(), 1
        t = threading.Thread(target=finalize_inside_lock, daemon=True)
        t.start()
        assert done.wait(10.0), "the finalizer waited for a lock its own thread holds"
        assert bid in ops._REG.entries  # not dropped yet: the lock was held
        assert ops.live_handles(1) >= 0  # any locked call drops it
        assert bid not in ops._REG.entries and bid not in ops._REG.limits
        ops._forget_buffer(bid)  # with the lock free: dropped at once
        assert bid not in ops._REG.forgotten
    finally:
        gc.enable()


@pytest.mark.parametrize("num_shards", [1, 2, 4])
def test_seeded_init_scales_of_a_sharded_expert(num_shards: int) -> None:
    """seeded_init_ draws w13 with std H^-0.5 and w2 with std F^-0.5 of the whole expert (F = the shard's columns
    times num_shards), on every shard of an expert split over a tensor-parallel group: the T shards together have
    the scales of the unsharded expert (the layer's output scale does not depend on T)."""
    hidden, ffn, experts = 64, 128, 4
    f = ffn // num_shards
    for shard in range(num_shards):
        ex = layers.GroupedExperts(experts, hidden, f, init=False)
        ex.seeded_init_(list(range(experts)), seed=5, shard=shard, num_shards=num_shards)
        for name, p, want in (("w13", ex.w13, hidden**-0.5), ("w2", ex.w2, ffn**-0.5)):
            got = float(p.detach().double().std())
            assert abs(got / want - 1) < 0.05, f"shard {shard} of {num_shards}: {name} std {got:.4g}, want {want:.4g}"


def _router_reference(x: torch.Tensor, weight: torch.Tensor, topk: int, score_func: str,
                      norm: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The router in float64 from the input's values: logits x @ W.T, softmax or sigmoid scores, the top-k, weights
    divided by their sum when normalised."""
    logits = x.double() @ weight.detach().double().t()
    scores = logits.softmax(dim=-1) if score_func == "softmax" else logits.sigmoid()
    w, idx = scores.topk(topk, dim=-1)
    return idx, (w / w.sum(dim=-1, keepdim=True) if norm else w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_linear_router_vs_reference(score_func: str, norm: bool, dtype: torch.dtype) -> None:
    """LinearTopKRouter against a float64 reference, for both score functions, with and without normalised
    weights, on float32 and bf16 inputs (the logits are float32 for any input dtype: a bf16 input's choices and
    weights are those of its values in float64, to float32 rounding)."""
    torch.manual_seed(4)
    hidden, experts, topk, tokens = 64, 16, 4, 96
    router = layers.LinearTopKRouter(hidden, experts, topk, score_func=score_func, norm_topk_prob=norm)
    x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(8)).to(dtype)
    idx, w = router(x)
    want_idx, want_w = _router_reference(x, router.weight, topk, score_func, norm)
    assert idx.dtype == torch.int64 and w.dtype == torch.float32 and idx.shape == w.shape == (tokens, topk)
    # (no near-ties among these scores: float32 and float64 pick the same experts, in the same order)
    assert torch.equal(idx, want_idx), (idx != want_idx).nonzero()[:4]
    layer_bodies.close(w, want_w, f"{score_func} norm={norm} {dtype}: weights", rtol=1e-5)
    if norm:
        assert torch.allclose(w.sum(dim=-1), torch.ones(tokens), atol=1e-6)


def test_gate_output_checks(pools) -> None:
    pools(1).run(layer_bodies.gate_output_checks)


def test_layer_node_limited_replicas(pools) -> None:
    pools(3).run(layer_bodies.layer_node_limited_replicas, [40, 33, 0], 4)


def test_ddp_over_replicated_params_matches_dense_steps(pools) -> None:
    """DDP over the gate, shared experts and dense layers (ddp_ignore_experts) + expert parallelism: two SGD steps
    with update_bias equal the dense single-process steps on all ranks' tokens (one chunk and two); DDP over the
    experts too is refused."""
    pools(4).run(layer_bodies.ddp_training_steps, [5, 7, 0, 6], 71)


@pytest.mark.gpu(2)
def test_ddp_over_replicated_params_matches_dense_steps_gpu(pools) -> None:
    """The same on CUDA with the nvshmem backend: DDP's backward all-reduces beside the Buffer's calls."""
    from largeep import native

    if native.unavailable_reason() is not None:
        pytest.skip(str(native.unavailable_reason()))
    pools(2, "nccl").run(layer_bodies.ddp_training_steps, [5, 0], 71, "nvshmem", "cuda")


def test_fsdp2_over_replicated_params_matches_dense_steps(pools) -> None:
    """FSDP2 (fully_shard, gloo) over the gate, shared experts and dense layers, the routed experts left out
    (ignored_params, or fully_shard on the replicated submodules only) + expert parallelism: two SGD steps with
    update_bias equal the dense single-process steps on all ranks' tokens (one chunk and two)."""
    pools(4).run(layer_bodies.fsdp_training_steps, [5, 7, 0, 6], 71)


def test_fsdp2_experts_over_ep_copies(pools) -> None:
    """fully_shard of the experts over ranks holding the same slots (copies of the EP group) works and equals an
    unsharded layer; over the EP group itself it is refused at the forward."""
    pools(4).run(layer_bodies.fsdp_experts_over_ep_copies)


def test_fsdp2_refused_after_registry_reuse(pools) -> None:
    """A fully_shard over the EP group applied after a forward is refused even where the registry of FSDP states
    kept its size (another sharded module was collected in between)."""
    pools(2).run(layer_bodies.fsdp_registry_reuse)


@pytest.mark.parametrize("world", [1, 4])
def test_serve_prefill_decode(pools, world: int) -> None:
    """One model's weights for prefill (normal mode, chunks) and decode (MoELayer.for_buffer on a low-latency
    Buffer), in eval mode, against a dense float32 reference; refusals, two-batch overlap, the gate's counts."""
    pools(world).run(layer_bodies.serve_prefill_decode)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu(1))])
def test_grouped_experts_under_autocast(device: str) -> None:
    """Inside torch.autocast the routed experts' GEMMs run in autocast's dtype, as nn.Linear's (they once ran in the
    float32 weights' dtype while the shared experts' ran in bf16): the output equals the same GEMMs on bf16 copies
    of x and the weights, bit for bit, in bf16; the float32 weights get float32 grads equal to those copies' grads;
    outside the region nothing changes. forward_rows under autocast returns x's dtype, from bf16 GEMMs."""
    torch.manual_seed(5)
    ex = layers.GroupedExperts(3, 16, 8).to(device)
    x = torch.randn(10, 16, device=device)
    offs = torch.tensor([3, 3, 9], dtype=torch.int32, device=device)  # an empty expert; row 9 past the last group
    plain = ex(x, offs)
    assert plain.dtype == torch.float32
    with torch.autocast(device, dtype=torch.bfloat16):
        got = ex(x, offs)
    w13, w2 = (w.detach().bfloat16().requires_grad_() for w in (ex.w13, ex.w2))
    h13 = ops.grouped_mm(x.bfloat16(), w13, offs)
    want = ops.grouped_mm(ops.expert_activation(h13, offs), w2, offs)  # (the activation: the experts' own op)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
    assert not torch.equal(got.float(), plain), "the autocast region changed nothing"
    cot = torch.randn(10, 16, device=device).bfloat16()
    (got * cot).sum().backward()
    (want * cot).sum().backward()
    assert ex.w13.grad is not None and ex.w13.grad.dtype == torch.float32
    assert torch.equal(ex.w13.grad, w13.grad.float()) and torch.equal(ex.w2.grad, w2.grad.float())  # type: ignore[union-attr]
    assert torch.equal(ex(x, offs), plain)  # outside the region: float32 again
    idx = torch.tensor([[0, 2], [1, -1], [2, 0], [-1, -1]], device=device)
    w = torch.rand(4, 2, device=device)
    rows = torch.randn(4, 16, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        y = ex.forward_rows(rows, idx, w)
    assert y.dtype == torch.float32
    close_to = ex.forward_rows(rows, idx, w)
    err = (y - close_to).abs().max() / close_to.abs().max()
    assert 0 < err < 2e-2, err


@pytest.mark.gpu(2)
def test_serve_for_buffer_gpu(pools) -> None:
    """A prefill layer and its low-latency twin (MoELayer.for_buffer) on the nvshmem backend share their weights."""
    from largeep import native

    if native.unavailable_reason() is not None:
        pytest.skip(str(native.unavailable_reason()))
    pools(2, "nccl").run(layer_bodies.serve_for_buffer_gpu, "nvshmem")


@pytest.mark.parametrize("world", [1, 4])
def test_clip_grad_norm_ep(pools, world: int) -> None:
    """layers.clip_grad_norm_: the whole model's gradient norm (2 and inf) with every logical expert once, the same
    on every rank, against a reference built from gather_global_experts; grads scaled by max_norm / norm."""
    pools(world).run(layer_bodies.clip_grad_norm_ep)


@pytest.mark.gpu(2)
def test_clip_grad_norm_ep_gpu(pools) -> None:
    """The same on CUDA with the nvshmem backend (2 ranks)."""
    from largeep import native

    if native.unavailable_reason() is not None:
        pytest.skip(str(native.unavailable_reason()))
    pools(2, "nccl").run(layer_bodies.clip_grad_norm_ep, "nvshmem", "cuda")
