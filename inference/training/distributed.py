"""Data-parallel training on PyTorch's distributed engine (``torch.distributed``), for every model.

Launch any training command under ``torchrun`` and it runs on N processes (ranks):

    torchrun --nproc_per_node 2 scripts/train.py vae --data shapes --epochs 2 --out runs/vae-dp

What each rank does (:class:`inference.trainer.Trainer` with a :class:`World` of size N):

* **its own shard of every epoch**, as ``torch.utils.data.DistributedSampler`` cuts it: one permutation
  of the training set per epoch, the same on every rank (the trainer's order generator, seeded by the
  run's seed), padded by repeating its first indices to a multiple of N, and rank r takes positions
  r, r + N, r + 2N, ... (:func:`shard`); ``batch_size`` is per rank, so a step sees N * batch_size
  examples;
* **gradients reduced by one all-reduce per step** (:func:`all_reduce_gradients`, as DDP does it,
  over one flat buffer that also carries the loss): summed when the loss is the batch sum, averaged when
  it is the mean (``mean_loss``), so N ranks with batch B take the step of one process on the N * B
  examples of their shards together; clipping and Adam then run on identical gradients, so the
  parameters stay identical on every rank (they are also broadcast from rank 0 when training starts);
* **its own randomness**: Pyro's draws (reparameterised noise, dropout) come from the global torch
  generator seeded with ``seed + rank``; batch transforms (dynamic binarisation) from a per-rank
  generator; rank 0 of an N-rank run draws what a 1-process run draws;
* **held-out metrics reduced over ranks**: each rank scores its share of the examples and the sums are
  all-reduced, so the ELBO reported is over the whole held-out set;
* **rank 0 alone writes** the run directory (config, metrics, checkpoints, figures); a checkpoint
  holds every rank's random state, so ``--resume`` with the same N continues exactly.

Backends: ``gloo`` on CPU, ``nccl`` on CUDA (each rank on ``cuda:LOCAL_RANK``). Several machines:
torchrun's usual rendezvous flags (``--nnodes``, ``--node_rank``, ``--rdzv_endpoint``); see
``docs/scaling.md``. No communication code of our own: everything goes through ``torch.distributed``.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, List, NamedTuple, Sequence

import torch
import torch.distributed as dist


class World(NamedTuple):
    """The ranks of a run: this process's ``rank`` of ``size`` (and ``local_rank`` on its machine)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Whether this rank writes files and prints (rank 0)."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.size > 1


def current_world() -> World:
    """The world of the initialised process group (a 1-rank world when there is none)."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))


def launched_in_parallel() -> bool:
    """Whether this process was started by torchrun (or alike) as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def main_process() -> bool:
    """Whether this process is rank 0 of its launch (or not launched in parallel), also outside the
    process group: what decides who prints a script's summary."""
    return int(os.environ.get("RANK", "0")) == 0


def backend_for(device: str) -> str:
    """``nccl`` for CUDA devices, ``gloo`` otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(device: str) -> Iterator[World]:
    """Join the process group torchrun set up (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT`` in the
    environment) for the duration of the block, with :func:`backend_for` ``device``; leave it after.
    Outside torchrun, or when a group is already initialised (e.g. by a test), it only yields the world."""
    if not launched_in_parallel() or dist.is_initialized():
        yield current_world()
        return
    if backend_for(device) == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend_for(device))
    try:
        yield current_world()
        dist.barrier()  # no rank tears its connections down while another is still in a collective
    finally:
        dist.destroy_process_group()


def rank_device(device: str, world: World) -> str:
    """The device of this rank: ``cuda`` becomes ``cuda:LOCAL_RANK`` in a parallel run."""
    if world.parallel and device == "cuda":
        return f"cuda:{world.local_rank}"
    return device


def shard(order: torch.Tensor, world: World) -> torch.Tensor:
    """This rank's share of the epoch's permutation ``order (N,)``, as ``DistributedSampler`` cuts it:
    padded with its own first entries to a multiple of the world size, then every ``size``-th entry from
    position ``rank``. Every rank gets ``ceil(N / size)`` examples."""
    if not world.parallel:
        return order
    per_rank = -(-order.numel() // world.size)  # ceil
    padding = per_rank * world.size - order.numel()
    padded = torch.cat([order, order[:padding]]) if padding else order
    return padded[world.rank :: world.size]


def rows_of(num: int, world: World) -> slice:
    """This rank's rows of a held-out set of ``num`` examples, for metrics that are sums over examples
    (no padding: each example is scored once over all ranks)."""
    return slice(world.rank, num, world.size) if world.parallel else slice(0, num)


def all_reduce_gradients(params: Sequence[torch.Tensor], loss: torch.Tensor, world: World,
                         average: bool) -> torch.Tensor:
    """Reduce the gradients of ``params`` over the ranks in one all-reduce (a flat buffer that also holds
    ``loss``, a scalar): summed, or averaged when ``average``. Parameters without a gradient (e.g. frozen
    ones) are left without one; which ones those are must agree over the ranks, as it does when it is
    decided by the epoch. Returns the loss summed over the ranks."""
    if not world.parallel:
        return loss.detach()
    with_grad = [p for p in params if p.grad is not None]
    flat = torch.cat([p.grad.reshape(-1) for p in with_grad] + [loss.detach().reshape(1).to(with_grad[0].grad if with_grad else loss)])
    dist.all_reduce(flat)
    grads = flat[:-1] / world.size if average else flat[:-1]
    offset = 0
    for p in with_grad:
        p.grad.copy_(grads[offset : offset + p.numel()].view_as(p.grad))
        offset += p.numel()
    return flat[-1]


def all_reduce_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    """``values`` summed over the ranks (a copy; unchanged in a 1-rank world)."""
    if not world.parallel:
        return values
    values = values.clone()
    dist.all_reduce(values)
    return values


def broadcast_tensors(tensors: Sequence[torch.Tensor], world: World) -> None:
    """Copy rank 0's values of ``tensors`` (parameters, buffers such as batch-norm statistics) to every
    rank, in place."""
    if not world.parallel:
        return
    for t in tensors:
        dist.broadcast(t.data, src=0)


def gather_objects(value: Any, world: World) -> List[Any]:
    """Every rank's ``value`` (picklable), in rank order, on every rank."""
    if not world.parallel:
        return [value]
    out: List[Any] = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def broadcast_object(value: Any, world: World) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not world.parallel:
        return value
    box = [value if world.main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], Any], world: World, share: bool = True) -> Any:
    """Run ``fn()`` on rank 0 only. Its result comes back on every rank (``share``) or on rank 0 alone
    (None elsewhere); an error it raises is raised on rank 0 and, as a ``RuntimeError`` quoting it, on
    every other rank, so that no rank is left waiting for one that stopped."""
    if not world.parallel:
        return fn()
    result, error = None, None
    if world.main:
        try:
            result = fn()
        except Exception as caught:  # noqa: BLE001 - re-raised below, on every rank
            error = caught
    message = None if error is None else f"{type(error).__name__}: {error}"
    shared = broadcast_object((result if share else None, message), world)
    if error is not None:
        raise error
    if shared[1] is not None:
        raise RuntimeError(f"rank 0 stopped: {shared[1]}")
    return result if world.main else shared[0]


def rank_seed(seed: int, world: World) -> int:
    """The seed of this rank's random draws: ``seed + rank`` (rank 0 draws as a 1-process run)."""
    return seed + world.rank
