"""Train a tiny MoE language model under expert parallelism: the whole recipe of docs/usage.md in one script.

    torchrun --nproc-per-node 2 examples/train_moe.py                 # no GPU: gloo, the torch backend
    torchrun --nproc-per-node 8 examples/train_moe.py --ep 4          # GPUs: NCCL; 2 data-parallel copies of EP 4
    torchrun --nproc-per-node 2 examples/train_moe.py --steps 20 --save ck.pt
    torchrun --nproc-per-node 2 examples/train_moe.py --steps 40 --resume ck.pt
    torchrun --nproc-per-node 2 examples/train_moe.py --gpt-oss      # GPT-OSS's experts and router

The model: token + position embeddings, two blocks of (causal attention, MoELayer with a TopKGate and shared
experts), an LM head. The data: sequences of tokens drawn from a skewed (Zipf) distribution, whose second half
repeats the first: the loss falls as the model learns the token frequencies (4.3 to about 3.0 in 30 steps), then
the copy (about 2.1 by step 150). The skew makes some experts hot, which the periodic re-placement answers with
replicas. Each step names the docs/usage.md section it follows, in quotes. The checkpoint is one file (every rank
reads it: a shared file system across hosts) with the experts per logical expert, so it resumes at another --ep.
"""

from __future__ import annotations

import argparse
import os
import time

import largeep
import torch
import torch.distributed as dist
import torch.nn.functional as F
from largeep import layers, native
from largeep import placement as pl
from largeep.gate import GateConfig, TopKGate, imbalance
from torch import nn

VOCAB, TOPK, HEADS, BLOCKS = 64, 2, 4, 2

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--steps", type=int, default=60, help="train up to this step (with --resume: the total)")
p.add_argument("--ep", type=int, default=0, help="expert-parallel size (default: every rank); divides the world")
p.add_argument("--experts", type=int, default=8, help="logical experts per MoE layer")
p.add_argument("--hidden", type=int, default=64)
p.add_argument("--seq", type=int, default=32, help="tokens per sequence (even)")
p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
p.add_argument("--lr", type=float, default=3e-3)
p.add_argument("--aux-coef", type=float, default=0.0, help="Switch aux-loss coefficient (0: none)")
p.add_argument("--replan-every", type=int, default=20, help="re-place the experts every N steps (0: never)")
p.add_argument("--save", help="checkpoint file written at the end")
p.add_argument("--resume", help="checkpoint file to continue from")
p.add_argument("--seed", type=int, default=0)
p.add_argument("--gpt-oss", action="store_true",
               help="GPT-OSS's MoE block: experts with biases and the clamped SwiGLU, a router with a bias")
args = p.parse_args()

# -- process groups and the Buffer ("A complete example"; with DP copies: "Gradients the layer leaves to you") --
gpu = torch.cuda.is_available()
if gpu:
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # before the group: NCCL uses the current GPU
dist.init_process_group("nccl" if gpu else "gloo")
dev = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
rank, world = dist.get_rank(), dist.get_world_size()
ep = args.ep or world
assert world % ep == 0 and args.seq % 2 == 0 and args.hidden % HEADS == 0, "--ep must divide the world; --seq even"
dp = world // ep  # data-parallel copies of the EP group: copy i is ranks [i*ep, (i+1)*ep)
ep_groups = [dist.new_group(list(range(i * ep, (i + 1) * ep))) for i in range(dp)]  # (every rank makes every group)
dp_groups = [dist.new_group(list(range(j, world, ep))) for j in range(ep)] if dp > 1 else [None] * ep
ep_group, dp_group = ep_groups[rank // ep], dp_groups[rank % ep]
slots_per_rank = -(-args.experts // ep) + 1  # one spare slot per rank: room for replicas of hot experts
tokens = args.batch * args.seq  # tokens per rank per step
# backend="auto": nvshmem where GPUs and the native module are there, else the torch backend
buf = largeep.Buffer(ep_group, hidden=args.hidden, num_experts=ep * slots_per_rank, num_topk=TOPK,
                     max_tokens_per_rank=tokens)
if rank == 0:
    print(f"world {world} ({'NCCL, GPUs' if gpu else 'gloo, CPU'}), EP {ep} x DP {dp}, {args.experts} experts on "
          f"{ep * slots_per_rank} slots, largeep backend {buf.backend_name}", flush=True)
    if buf.backend_name != "nvshmem":
        print(f"  (not nvshmem: {native.unavailable_reason() or 'see the warning above'})", flush=True)
topo = pl.Topology(num_nodes=ep // buf.ctx.ranks_per_node, gpus_per_node=buf.ctx.ranks_per_node,
                   slots_per_gpu=slots_per_rank)


# -- the model ----------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, plan: pl.Placement) -> None:
        super().__init__()
        h = args.hidden
        self.norm1, self.norm2 = nn.LayerNorm(h), nn.LayerNorm(h)
        self.qkv, self.proj = nn.Linear(h, 3 * h), nn.Linear(h, h)
        gate = TopKGate(GateConfig(hidden=h, num_experts=args.experts, topk=TOPK, aux_loss_coef=args.aux_coef,
                                   router_bias=args.gpt_oss))
        # GPT-OSS's experts ("Porting a Hugging Face MoE block"): biases and the clamped SwiGLU, no shared experts
        kinds = {"expert_mlp_bias": True, "expert_activation": layers.ClampedSwiGLU()} if args.gpt_oss else \
            {"shared_ffn_hidden": h}
        self.moe = layers.MoELayer(buf, ffn_hidden=2 * h, gate=gate, placement=plan, **kinds)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, s, 3, HEADS, h // HEADS).transpose(1, 3).unbind(2)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, h))
        return x + self.moe(self.norm2(x).reshape(b * s, h)).view(b, s, h)  # MoELayer takes [tokens, H]


class TinyMoELM(nn.Module):
    def __init__(self, plans: list[pl.Placement]) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(VOCAB, args.hidden), nn.Embedding(args.seq, args.hidden)
        self.blocks = nn.ModuleList(Block(plan) for plan in plans)
        self.norm, self.head = nn.LayerNorm(args.hidden), nn.Linear(args.hidden, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.norm(x))


def expert_moments(moe: layers.MoELayer, st: dict, m: str) -> list[torch.Tensor]:
    """The AdamW moment ``m`` of each of the layer's expert parameters (w13, w2, and b13, b2 with biases)."""
    return [st["state"][index[id(q)]][m] for q in moe.experts.parameters()]


def batch(step: int) -> torch.Tensor:
    """This rank's sequences at ``step``: a function of (seed, step, rank) only, so a resumed run sees the same."""
    g = torch.Generator().manual_seed(args.seed * 1_000_003 + step * 1009 + rank)
    zipf = 1.0 / torch.arange(1, VOCAB + 1).float() ** 1.2
    half = torch.multinomial(zipf, args.batch * args.seq // 2, replacement=True, generator=g).view(args.batch, -1)
    return torch.cat([half, half], dim=1).to(dev)


# every rank the same seed: the replicated weights start equal, and every replica of an expert too ("Initial weights")
torch.manual_seed(args.seed)
ck = torch.load(args.resume, map_location="cpu") if args.resume else None
# the first placement: the checkpoint's where it has as many slots, else the experts spread evenly, the spare slots
# filled with replicas (no loads measured yet)
same_slots = ck is not None and ck["placements"][0].numel() == topo.num_slots
plans = [pl.Placement(topo, args.experts, t) for t in ck["placements"]] if same_slots else \
    [pl.greedy_placement(torch.ones(args.experts), topo)] * BLOCKS
model = TinyMoELM(plans).to(dev)  # (a layer is built on the default device, not the Buffer's)
moes = [m for m in model.modules() if isinstance(m, layers.MoELayer)]
opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
index = {id(q): i for i, q in enumerate(model.parameters())}  # (the optimizer's state keys)
expert_keys = [(f"blocks.{i}.moe.experts.", f"blocks.{i}.moe.slot_experts") for i in range(BLOCKS)]
start, loads = 0, [torch.zeros(args.experts) for _ in moes]  # loads summed since the last re-plan

# -- resume ("Checkpoints": the global experts and their AdamW moments, cut into this rank's slots) ----------
if ck is not None:
    model.load_state_dict(ck["rest"], strict=False)  # the replicated part: no experts, no slot_experts
    st = ck["opt"]
    # (each layer's gate takes its own placement's replica counts again after the load above: MoELayer does that)
    for moe, experts, moments in zip(moes, ck["experts"], ck["moments"], strict=True):
        moe.load_global_experts(*experts)  # this rank's slots, under this run's placement
        for m, glob in moments.items():  # (w13, w2, and b13, b2 with biases: local_experts gives them in that order)
            for q, mine in zip(moe.experts.parameters(), moe.local_experts(*glob), strict=True):
                st["state"][index[id(q)]][m] = mine
    opt.load_state_dict(st)
    start, loads = ck["step"], ck["loads"]
    assert start <= args.steps, f"--steps {args.steps}: the checkpoint is at step {start} already"

# -- DDP over the replicated parameters ("Gradients the layer leaves to you") -------------------------------
layers.ddp_ignore_experts(model)  # before DDP: the experts (and the gates' load counts) stay each rank's own
ddp = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if gpu else None)


def gpu_balance(load: torch.Tensor, plan: pl.Placement) -> float:
    """max / mean of the ranks' loads, each replica taking an even share of its expert's (Placement.gpu_share)."""
    return float(imbalance(load @ plan.gpu_share()))


windows: list[float] = []  # layer 0's GPU balance in each re-plan window, under the plan it ran
t0 = time.perf_counter()
for step in range(start, args.steps):
    ids = batch(step)
    logits = ddp(ids[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))  # this rank's tokens
    if args.aux_coef > 0:  # the gates' Switch loss (GateConfig.aux_loss_coef), kept in each layer's aux_loss
        loss = loss + sum(moe.aux_loss for moe in moes)
    loss.backward()  # DDP averages the replicated grads over the world
    for i, moe in enumerate(moes):
        w = list(moe.experts.parameters())  # (w13, w2, and b13, b2 with biases)
        for q in w:  # an expert's grad is the sum over its EP group's losses: make it the mean, as DDP's
            q.grad /= ep
            if dp > 1:  # copies of the EP group hold the same experts: average over them too
                dist.all_reduce(q.grad, group=dp_group)
                q.grad /= dp
        if int(plans[i].replica_count.max()) > 1:  # replicas: each slot holds a share ("Moving experts ...")
            layers.allreduce_replica_grads(w, moe.phys_to_log, group=buf.ctx.group)
    layers.clip_grad_norm_(model, 1.0)  # not torch's: each rank holds other experts ("Clipping")
    opt.step()
    opt.zero_grad()
    # aux-loss-free balancing: counts summed over every rank holding the gate ("Routing and balancing")
    for i, moe in enumerate(moes):
        loads[i] += moe.gate.update_bias(dist.group.WORLD).cpu()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    if rank == 0:
        print(f"step {step:4d}  loss {float(mean) / world:.6f}", flush=True)
    # periodic re-placement from the measured loads ("Moving experts to a new placement during training")
    if args.replan_every and (step + 1) % args.replan_every == 0:  # (at the last step too: a resumed run agrees)
        for i, moe in enumerate(moes):
            shared = [pl.plan_placement(loads[i], topo) if rank == 0 else None]
            dist.broadcast_object_list(shared, src=0)  # every rank the same plan
            new = shared[0]
            moe.set_placement(new, optimizer=opt)  # collective; moves weights and AdamW moments in place
            before, after = gpu_balance(loads[i], plans[i]), gpu_balance(loads[i], new)
            if i == 0:
                windows.append(before)
            if rank == 0:
                hot = [e for e, c in enumerate(new.replica_count.tolist()) if c > 1]
                print(f"  re-plan layer {i}: expert load max/mean {float(imbalance(loads[i])):.2f}, GPU load "
                      f"max/mean {before:.2f} -> {after:.2f} on the same loads; replicated: {hot}", flush=True)
            plans[i], loads[i] = new, torch.zeros(args.experts)
if gpu:
    torch.cuda.synchronize()
elapsed = time.perf_counter() - t0

# -- save ("Checkpoints": gathered to rank 0 of the EP group, on its CPU; one file) --------------------------
if args.save:
    st = opt.state_dict()
    lean = {"dst": 0, "device": "cpu"}  # rank 0 receives; the others get None
    gathered, moments = [], []
    for moe in moes:  # collective over each EP group: the first copy's is enough
        if rank < ep:
            gathered.append(moe.gather_global_experts(**lean))
            moments.append({})
            for m in ("exp_avg", "exp_avg_sq"):  # (the biases' moments by name: all four given, or none)
                t = expert_moments(moe, st, m)
                biases = {"b13": t[2], "b2": t[3]} if len(t) == 4 else {}
                moments[-1][m] = moe.gather_global_experts(t[0], t[1], **biases, **lean)
    if rank == 0:
        rest = {k: v for k, v in model.state_dict().items()
                if not any(k.startswith(e) or k == s for e, s in expert_keys)}
        torch.save({"rest": rest, "experts": gathered, "moments": moments, "opt": st, "step": args.steps,
                    "loads": loads, "placements": [moe.phys_to_log.cpu() for moe in moes]}, args.save)
        print(f"saved {args.save} at step {args.steps}", flush=True)
    dist.barrier()

if rank == 0:
    done = args.steps - start
    rate = done * args.batch * (args.seq - 1) * world / max(elapsed, 1e-9)
    print(f"done: {done} steps in {elapsed:.2f} s, {rate:.0f} tokens/s over {world} ranks")
    if float(loads[0].sum()) > 0:
        windows.append(gpu_balance(loads[0], plans[0]))  # (the last window, since the last re-plan)
    print("layer 0 GPU load max/mean per re-plan window (the first under the placement the run started with): "
          + " ".join(f"{b:.2f}" for b in windows))
buf.destroy()
dist.destroy_process_group()
