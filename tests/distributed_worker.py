"""The rank program of tests/test_distributed.py (a module of its own, so that spawned processes can
import it): joins a 2-rank gloo group and trains, writing what the tests compare to ``folder``."""
import os

import pyro
import torch
import torch.distributed as dist

from gloo_retry import enable_fault_handler
from inference.training.distributed import World
from inference.runs.experiment import RunSpec, train
from inference.recipes.registry import get_recipe
from inference.trainer import TrainConfig, Trainer
from pyro_models.datasets import ImageData, SequenceData
from pyro_models.dmm import DMMConfig

NUM_TRAIN, NUM_TEST, SEED = 30, 6, 3  # 30 examples: shards of 15, padded from 30 to 30 (no padding) ...
NUM_PADDED = 29  # ... and 29: DistributedSampler pads to 30 with the permutation's first index


def tiny_config(**overrides) -> TrainConfig:
    base = dict(epochs=1, batch_size=4, lr=0.01, clip_norm=5.0, progress=False, train_eval_size=4, eval_batch_size=4,
                seed=SEED)
    return TrainConfig(**{**base, **overrides})


def tiny_data(num_train: int = NUM_TRAIN):
    config, shape = get_recipe("vae").example()
    x = torch.rand((num_train + NUM_TEST,) + tuple(shape), generator=torch.Generator().manual_seed(0))
    return config, ImageData(x[:num_train], x[num_train:], "random")


TINY_DMM = DMMConfig(z_dim=3, transition_dim=8, emission_hidden=(8,), rnn_dim=8)


def ragged_data() -> SequenceData:
    """Binary sequences of lengths 2-8 (frames (5,)), padded to 8, with a validation split."""
    gen = torch.Generator().manual_seed(1)

    def split(n):
        lengths = torch.randint(2, 9, (n,), generator=gen)
        inside = (torch.arange(8) < lengths.unsqueeze(-1)).unsqueeze(-1)
        return (torch.rand(n, 8, 5, generator=gen) > 0.6).float() * inside, lengths

    (x, lengths), (valid, valid_lengths), (test, test_lengths) = split(17), split(5), split(5)
    return SequenceData(x, test, "ragged", train_lengths=lengths, test_lengths=test_lengths, valid=valid,
                        valid_lengths=valid_lengths)


def build(config):
    pyro.clear_param_store()
    torch.manual_seed(SEED)
    return get_recipe("vae").build(tuple(tiny_data()[1].train.shape[1:]), config)


def fit_and_save(folder: str, rank: int, name: str, num_train: int, mean_loss: bool) -> None:
    config, data = tiny_data(num_train)
    model, guide = build(config)
    trainer = Trainer(model, guide, tiny_config(mean_loss=mean_loss), world=World(rank, 2))
    trainer.fit(data.train, data.test)
    torch.save([p.detach().clone() for p in trainer.params], os.path.join(folder, f"{name}-rank{rank}.pt"))


def main(rank: int, folder: str) -> None:
    enable_fault_handler()
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'rendezvous')}", rank=rank, world_size=2)
    try:
        for mean_loss in (False, True):
            fit_and_save(folder, rank, f"fit-mean{int(mean_loss)}", NUM_TRAIN, mean_loss)
        fit_and_save(folder, rank, "fit-padded", NUM_PADDED, False)
        config, data = tiny_data()
        spec = RunSpec("vae", config, tiny_config(epochs=2))
        train(spec, os.path.join(folder, "straight"), data=data)
        train(RunSpec("vae", config, tiny_config(epochs=1)), os.path.join(folder, "resumed"), data=data)
        train(spec, os.path.join(folder, "resumed"), resume=True, data=data)
        ragged = ragged_data()  # sequences of different lengths: bucketed batches sharded over the ranks
        spec = RunSpec("dmm", TINY_DMM, tiny_config(epochs=2, batch_size=3))
        train(spec, os.path.join(folder, "ragged-straight"), data=ragged)
        train(RunSpec("dmm", TINY_DMM, tiny_config(epochs=1, batch_size=3)), os.path.join(folder, "ragged-resumed"), data=ragged)
        train(spec, os.path.join(folder, "ragged-resumed"), resume=True, data=ragged)
    finally:
        dist.destroy_process_group()
