"""Data-parallel training on torch.distributed: two CPU processes (gloo), spawned here, against a one-process
reference computed independently of torch.distributed, and a two-process run that resumes exactly."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gloo_retry import spawn_with_retry  # tests/gloo_retry.py
import distributed_worker as worker  # tests/distributed_worker.py: the program of each rank
from inference.training.distributed import World, shard
from inference.runs.rundir import read_checkpoint
from inference.trainer import Trainer

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
WORLD = 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One spawn of two ranks for every test of this module (starting processes is the slow part)."""
    def launch():
        folder = str(tmp_path_factory.mktemp("ranks"))
        mp.spawn(worker.main, args=(folder,), nprocs=WORLD, join=True)
        return folder

    return spawn_with_retry(launch)


def reference_parameters(num_train: int, mean_loss: bool):
    """The parameters after one epoch of one process that steps on the union of the two ranks' batches,
    each half scored with its rank's random stream (seed + rank), so with the same per-example noise:
    the gradient of the union's loss (sum: the halves' sum; mean: over all examples of both), then the
    clip and Adam of the trainer. Built from torch.randperm and slicing, not from the library's sharding."""
    config, data = worker.tiny_data(num_train)
    model, guide = worker.build(config)
    train_config = worker.tiny_config(mean_loss=mean_loss)
    trainer = Trainer(model, guide, train_config, world=World())
    states = []
    for rank in range(WORLD):  # each rank's stream after the optimiser's dry run, as fit() has it
        torch.manual_seed(worker.SEED + rank)
        trainer.setup(data.train[: train_config.batch_size])
        states.append(torch.get_rng_state())
    order = torch.randperm(num_train, generator=torch.Generator().manual_seed(worker.SEED))
    order = torch.cat([order, order[: (-num_train) % WORLD]])  # pad to a multiple of the world size
    shards = [order[rank::WORLD] for rank in range(WORLD)]
    batch = train_config.batch_size
    for start in range(0, shards[0].numel(), batch):
        halves = [data.train[s[start : start + batch]] for s in shards]
        trainer.optimizer.zero_grad(set_to_none=True)
        for rank, half in enumerate(halves):
            torch.set_rng_state(states[rank])
            loss = trainer.loss(half)
            (loss / (sum(h.shape[0] for h in halves)) if mean_loss else loss).backward()
            states[rank] = torch.get_rng_state()
        torch.nn.utils.clip_grad_norm_(trainer.params, train_config.clip_norm)
        trainer.optimizer.step()
    return [p.detach() for p in trainer.params]


@pytest.mark.parametrize("name, num_train, mean_loss", [
    ("fit-mean0", worker.NUM_TRAIN, False), ("fit-mean1", worker.NUM_TRAIN, True), ("fit-padded", worker.NUM_PADDED, False),
])
def test_two_ranks_step_as_one_process_on_their_shards_together(runs, name, num_train, mean_loss):
    ranks = [torch.load(os.path.join(runs, f"{name}-rank{r}.pt")) for r in range(WORLD)]
    reference = reference_parameters(num_train, mean_loss)
    config, data = worker.tiny_data(num_train)
    untrained = Trainer(*worker.build(config), worker.tiny_config(), world=World())
    untrained.setup(data.train[:4])
    assert len(ranks[0]) == len(reference) == len(untrained.params)
    for p0, p1, ref in zip(*ranks, reference):
        assert torch.equal(p0, p1)  # identical on both ranks
        torch.testing.assert_close(p0, ref, rtol=1e-5, atol=1e-6)  # the one-process step on the union
    moved = max(float((p.detach() - q).abs().max()) for p, q in zip(untrained.params, ranks[0]))
    assert moved > 1e-3  # training moved the parameters: the comparison is not between two initialisations


def test_shard_pads_and_interleaves_as_distributed_sampler():
    order = torch.tensor([4, 0, 3, 1, 2])
    assert shard(order, World(0, 2)).tolist() == [4, 3, 2]
    assert shard(order, World(1, 2)).tolist() == [0, 1, 4]  # padded with the first index
    assert torch.equal(shard(order, World()), order)


def test_two_rank_run_resumes_exactly_and_rank_zero_writes_alone(runs):
    straight, resumed = (os.path.join(runs, name) for name in ("straight", "resumed"))
    a, b = read_checkpoint(straight), read_checkpoint(resumed)
    assert a["epoch"] == b["epoch"] == 2 and a["world_size"] == 2 and len(a["ranks"]) == 2
    torch.testing.assert_close(a["objective"], b["objective"], rtol=0, atol=0)  # exactly the same weights
    lines = [[json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))] for path in (straight, resumed)]
    assert [m["epoch"] for m in lines[0]] == [1, 2] == [m["epoch"] for m in lines[1]]
    for m, n in zip(*lines):
        assert m["test_elbo"] == n["test_elbo"] and m["train_elbo"] == n["train_elbo"]


def test_a_two_rank_ragged_run_shards_bucketed_batches_and_resumes_exactly(runs):
    straight, resumed = (os.path.join(runs, name) for name in ("ragged-straight", "ragged-resumed"))
    a, b = read_checkpoint(straight), read_checkpoint(resumed)
    assert a["epoch"] == b["epoch"] == 2 and a["world_size"] == 2
    torch.testing.assert_close(a["objective"], b["objective"], rtol=0, atol=0)
    lines = [[json.loads(line) for line in open(os.path.join(path, "metrics.jsonl"))] for path in (straight, resumed)]
    for m, n in zip(*lines):
        assert m["valid_elbo_per_step"] == n["valid_elbo_per_step"] and m["test_elbo"] == n["test_elbo"]
    assert os.path.isfile(os.path.join(straight, "best.pt"))
