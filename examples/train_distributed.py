"""Data-parallel training with flash_fx: DistributedDataParallel and FSDP2 (`fully_shard`), each compared step by
step with the same model trained without flash_fx.

    torchrun --nproc_per_node 2 examples/train_distributed.py             # gloo on CPU (NCCL on GPUs)

Each process trains a small GPT-style decoder (flash_fx.bench.models.Transformer) on its own batches for a few
steps, twice from the same weights: eager, and compiled with backend="flash_fx". It prints the largest loss and
parameter-gradient differences between the two and the attention rewrites of every compiled graph (DDP's
optimizer cuts the graph at its bucket boundaries, FSDP2 compiles per block; no attention may be left
unrewritten). The last line of rank 0 is
`distributed OK` when every difference is within tolerance.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import flash_fx
from flash_fx.bench.models import Transformer, model_inputs

STEPS, LAYERS, WIDTH, HEADS, VOCAB, N, BATCH = 3, 4, 128, 4, 256, 48, 2


def local(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor (the local shard of an FSDP2 DTensor)."""
    return t.to_local() if hasattr(t, "to_local") else t


def train(model: torch.nn.Module, runner, rank: int) -> tuple[list[float], dict[str, torch.Tensor]]:
    """STEPS of SGD on this rank's batches; the losses and the last step's gradients (local shards)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for step in range(STEPS):
        tokens, key_valid, doc_ids = model_inputs(BATCH, N, VOCAB, "cpu", seed=100 * step + rank)
        logits = runner(tokens, key_valid, doc_ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        losses.append(loss.item())
        grads = {name: local(p.grad).detach().clone() for name, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
    return losses, grads


def compare(mode: str, wrap, rank: int) -> float:
    torch.manual_seed(0)
    base = Transformer("gpt", WIDTH, HEADS, LAYERS, vocab=VOCAB, max_len=N)
    reference, candidate = wrap(copy.deepcopy(base)), wrap(copy.deepcopy(base))
    flash_fx.clear_reports()
    torch._dynamo.reset()
    # force: at this toy size the CPU's cost model would keep attention unfused; the point here is the rewritten
    # graphs under DDP's graph splitting and FSDP2's hooks
    compiled = torch.compile(candidate, backend="flash_fx",
                             options={"inner": "aot_eager", "report": False, "force": True})
    ref_losses, ref_grads = train(reference, reference, rank)
    losses, grads = train(candidate, compiled, rank)
    reports = flash_fx.reports()
    rewrites = [[r.variant for r in report.rewrites] for report in reports]
    skipped = [s.reason for report in reports for s in report.skipped]
    loss_diff = max(abs(a - b) for a, b in zip(losses, ref_losses, strict=True))
    grad_diff = max(float((grads[n] - g).abs().max()) for n, g in ref_grads.items())
    if rank == 0:
        print(f"{mode}: losses {[round(x, 5) for x in losses]}; max loss diff {loss_diff:.2e}, "
              f"max grad diff {grad_diff:.2e}; rewrites per compiled graph {rewrites}")
    # Repeated blocks may share one compiled graph (Dynamo reuses it), so count graphs, not layers.
    assert any(rewrites) and not skipped, f"{mode}: rewrites {rewrites}, skipped {skipped}"
    return max(loss_diff, grad_diff)


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))

    def ddp(model):
        # small buckets: DDP's graph optimizer cuts the compiled graph into one piece per bucket
        return DistributedDataParallel(model, bucket_cap_mb=1)

    def fsdp2(model):
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)

    worst = max(compare("DDP", ddp, rank), compare("FSDP2", fsdp2, rank))
    ok = torch.tensor([worst < 1e-4], dtype=torch.int32)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if rank == 0:
        print("distributed OK" if ok.item() else f"distributed MISMATCH (worst difference {worst:.2e})")
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "0")
    main()
