"""Real sequences: the polyphonic-music loaders (note-list JSON, the authors' pickles, .mat), lengths in a
user's npz, bucketed batches cut to their longest sequence, the validation split and its best epoch, exact
resume on ragged data, and the command line on a tiny music set."""
import json
import math
import os
import pickle
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from inference.training import TIMINGS
from inference.training.batching import bucketed_order, cut_to_length
from inference.runs.experiment import RunSpec, load_run, train
from inference.trainer import TrainConfig, Trainer
from pyro_models.datasets import load_sequence_npz
from pyro_models.datasets.configs import SequenceDataConfig
from pyro_models.datasets.polyphonic import NUM_KEYS, load_polyphonic, random_transposer, transpose
from pyro_models.datasets.sequences import SequenceData
from pyro_models.dmm import DMMConfig, build_dmm
from inference.recipes.dmm import DMMOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_DMM = DMMConfig(z_dim=3, transition_dim=8, emission_hidden=(8,), rnn_dim=8)


def note_lists(seed=0, sizes=(9, 3, 4), longest=12):
    """Random chorales as note lists: {split: [[[MIDI notes] per step] per sequence]}."""
    rng = np.random.default_rng(seed)
    return {split: [[sorted(int(n) for n in rng.choice(np.arange(40, 80), rng.integers(0, 4), replace=False))
                     for _ in range(int(rng.integers(2, longest + 1)))] for _ in range(size)]
            for split, size in zip(("train", "valid", "test"), sizes)}


@pytest.fixture
def music(tmp_path):
    notes = note_lists()
    with open(tmp_path / "jsb_chorales.json", "w") as f:
        json.dump(notes, f)
    return str(tmp_path), notes


def test_note_lists_become_padded_piano_rolls_with_lengths(music):
    folder, notes = music
    splits = load_polyphonic("jsb", folder)
    for split, sequences in notes.items():
        rolls, lengths = splits[split]
        assert rolls.shape == (len(sequences), max(map(len, sequences)), NUM_KEYS)
        assert lengths.tolist() == [len(s) for s in sequences]
        for i, sequence in enumerate(sequences):
            for t, step in enumerate(sequence):
                assert sorted(int(k) + 21 for k in torch.nonzero(rolls[i, t]).flatten()) == step
            assert not rolls[i, len(sequence):].any()  # zeros past the end


def test_the_authors_pickles_are_read_and_nothing_else_is_built(tmp_path, music):
    _, notes = music
    as_tuples = {k: [[tuple(step) for step in s] for s in v] for k, v in notes.items()}  # the originals hold tuples
    with open(tmp_path / "Nottingham.pickle", "wb") as f:
        pickle.dump(as_tuples, f, protocol=2)
    rolls, lengths = load_polyphonic("nottingham", str(tmp_path))["test"]
    assert lengths.tolist() == [len(s) for s in notes["test"]]

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    with open(tmp_path / "MuseData.pickle", "wb") as f:
        pickle.dump({"train": Payload()}, f)
    with pytest.raises(ValueError, match="refusing to build"):
        load_polyphonic("musedata", str(tmp_path))


def test_mat_files_are_read_with_scipy(tmp_path, music):
    scipy_io = pytest.importorskip("scipy.io")
    _, notes = music
    splits = load_polyphonic("jsb", music[0])
    cells = {}
    for split in ("train", "valid", "test"):
        rolls, lengths = splits[split]
        cell = np.empty((1, len(lengths)), dtype=object)
        for i, n in enumerate(lengths.tolist()):
            cell[0, i] = rolls[i, :n].numpy()
        cells[f"{split}data"] = cell
    scipy_io.savemat(tmp_path / "Piano_midi.mat", cells)
    rolls, lengths = load_polyphonic("piano", str(tmp_path))["valid"]
    assert torch.equal(rolls, splits["valid"][0]) and torch.equal(lengths, splits["valid"][1])


@pytest.mark.parametrize("content, message", [
    ({"train": [[[60]]], "valid": [[[60]]]}, r"expected the splits \['train', 'valid', 'test'\]"),
    ({"train": [[[60]]], "valid": [[[60]]], "test": [[[12]]]}, "step 0 has note 12, outside the piano"),
    ({"train": [[]], "valid": [[[60]]], "test": [[[60]]]}, r"the train split has empty sequences \[0\]"),
])
def test_bad_music_files_are_refused_in_one_line(tmp_path, content, message):
    with open(tmp_path / "jsb_chorales.json", "w") as f:
        json.dump(content, f)
    with pytest.raises(ValueError, match=message):
        load_polyphonic("jsb", str(tmp_path))


def test_a_missing_music_file_names_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="holds none of .*jsb_chorales.json"):
        load_polyphonic("jsb", str(tmp_path))
    with pytest.raises(ValueError, match="data_dir: data 'jsb' needs"):
        SequenceDataConfig(data="jsb").load()


def test_npz_lengths_make_ragged_sequences_and_past_the_end_is_never_read(tmp_path):
    sequences = np.random.default_rng(0).random((6, 5, 4)).astype(np.float32)
    lengths = np.array([5, 2, 3, 5, 1, 4])
    for i, n in enumerate(lengths):
        sequences[i, n:] = np.nan  # anything past the end
    np.savez(tmp_path / "seq.npz", sequences=sequences, lengths=lengths)
    data = load_sequence_npz(str(tmp_path / "seq.npz"))
    assert data.ragged and data.train_lengths.tolist() == [5, 2, 3, 5, 1] and data.test_lengths.tolist() == [4]
    assert torch.isfinite(data.train).all() and not data.train[1, 2:].any()
    for bad, message in (([5, 2, 3, 5, 1, 6], r"lengths in \[1, T = 5\]"), ([5, 2], r"expected shape \(N,\) = \(6,\)"),
                         ([5, 2, 3, 5, 1.5, 4], "whole numbers")):
        np.savez(tmp_path / "bad.npz", sequences=np.zeros((6, 5, 4)), lengths=np.array(bad))
        with pytest.raises(ValueError, match=message):
            load_sequence_npz(str(tmp_path / "bad.npz"))


def test_bucketed_batches_are_a_seeded_permutation_of_similar_lengths():
    lengths = torch.randint(1, 100, (97,), generator=torch.Generator().manual_seed(0))
    order = bucketed_order(lengths, 10, 4, torch.Generator().manual_seed(1))
    assert sorted(order.tolist()) == list(range(97))
    assert torch.equal(order, bucketed_order(lengths, 10, 4, torch.Generator().manual_seed(1)))
    for batch in order.split(10):  # the trainer's batches: each longest first (no reordering in the model)
        assert (lengths[batch][:-1] >= lengths[batch][1:]).all()
    padded = sum(int(lengths[b].max()) * len(b) for b in order.split(10))
    random = bucketed_order(lengths, 10, 1, torch.Generator().manual_seed(1))
    assert padded < 0.8 * sum(int(lengths[b].max()) * len(b) for b in random.split(10))
    x, mask, cut_lengths = cut_to_length((torch.zeros(3, 9, 2), torch.ones(3, 9, dtype=torch.bool), torch.tensor([4, 2, 3])), 2)
    assert x.shape == (3, 4, 2) and mask.shape == (3, 4) and cut_lengths.tolist() == [4, 2, 3]


def ragged_data(seed=0):
    gen = torch.Generator().manual_seed(seed)

    def split(n):
        lengths = torch.randint(2, 9, (n,), generator=gen)
        x = (torch.rand(n, 8, 6, generator=gen) > 0.6).float() * (torch.arange(8) < lengths.unsqueeze(-1)).unsqueeze(-1)
        return x, lengths

    (train_x, train_l), (valid_x, valid_l), (test_x, test_l) = split(23), split(7), split(6)
    return SequenceData(train_x, test_x, "tiny-music", train_lengths=train_l, test_lengths=test_l, valid=valid_x,
                        valid_lengths=valid_l)


def spec(**train):
    return RunSpec("dmm", TINY_DMM, TrainConfig(**{**dict(epochs=3, batch_size=5, progress=False, train_eval_size=10), **train}))


def without_time(metrics):
    return [{k: v for k, v in m.items() if k not in TIMINGS} for m in metrics]


def test_a_ragged_run_resumes_exactly_and_keeps_its_best_epoch(tmp_path):
    data = ragged_data()
    straight = train(spec(), str(tmp_path / "a"), data=data)
    train(spec(epochs=2), str(tmp_path / "b"), data=data)
    resumed = train(spec(), str(tmp_path / "b"), resume=True, data=data)
    assert without_time(resumed) == without_time(straight[2:])
    for key in ("valid_elbo", "valid_elbo_per_step", "test_elbo_per_step", "train_elbo_per_step"):
        assert key in straight[0]
    frames = int(data.test_lengths.sum())
    assert straight[0]["test_elbo_per_step"] == pytest.approx(straight[0]["test_elbo"] * 6 / frames)
    best_epoch = max(straight, key=lambda m: m["valid_elbo"])["epoch"]
    best = torch.load(tmp_path / "a" / "best.pt", weights_only=False)
    assert best["epoch"] == best_epoch
    run = load_run(str(tmp_path / "a"), data=data, checkpoint="best")
    assert torch.equal(run.model.z_0, best["objective"]["model.z_0"])


@pytest.mark.parametrize("keys", [6, 12])
def test_transpose_moves_every_note_by_its_own_shift(keys):
    rolls = (torch.rand(5, 4, keys) > 0.5).float()
    shifts = torch.tensor([-3, 0, 2, keys, -keys - 1])
    moved = transpose(rolls, shifts)
    expected = torch.zeros_like(rolls)
    for b, shift in enumerate(shifts.tolist()):
        for k in range(keys):
            if 0 <= k - shift < keys:
                expected[b, :, k] = rolls[b, :, k - shift]
    assert torch.equal(moved, expected)


def test_random_transposition_draws_every_shift_alike_and_is_not_scored(tmp_path):
    transform = random_transposer(2)
    rolls = torch.zeros(20000, 1, 9)
    rolls[:, :, 4] = 1.0  # one note in the middle: where it lands gives the shift
    landed = transform(rolls, torch.Generator().manual_seed(0))[:, 0].argmax(-1) - 4  # (20000,)
    counts = torch.stack([(landed == s).sum() for s in range(-2, 3)]).float()
    # each of the 5 shifts has probability 1/5: standard error sqrt(n p (1 - p)) = 57 draws; 5 of them allowed
    assert ((counts - 4000).abs() < 5 * math.sqrt(20000 * 0.2 * 0.8)).all() and counts.sum() == 20000
    with pytest.raises(ValueError, match="^max_shift: expected >= 0, got -1"):
        random_transposer(-1)
    # training on transposed rolls; the training ELBO reported scores the rolls as they are
    data = ragged_data()
    model, guide = build_dmm((6,), TINY_DMM)
    trainer = Trainer(model, guide, TrainConfig(progress=False, train_eval_size=10), batch_transform=transform)
    assert torch.equal(trainer._train_eval((data.train, data.train_lengths))[0], data.train[:10])
    plain = RunSpec("dmm", TINY_DMM, TrainConfig(epochs=1, batch_size=5, progress=False, train_eval_size=10))
    moved = RunSpec("dmm", TINY_DMM, plain.train, options=DMMOptions(transpose_semitones=2))
    a, b = train(plain, str(tmp_path / "a"), data=data), train(moved, str(tmp_path / "b"), data=data)
    assert a[0]["train_objective"] != b[0]["train_objective"]  # other batches were trained on
    straight = train(replace(moved, train=replace(plain.train, epochs=3)), str(tmp_path / "c"), data=data)
    train(replace(moved, train=replace(plain.train, epochs=2)), str(tmp_path / "d"), data=data)
    resumed = train(replace(moved, train=replace(plain.train, epochs=3)), str(tmp_path / "d"), resume=True, data=data)
    assert without_time(resumed) == without_time(straight[2:])  # the draws resume exactly


def test_eval_every_scores_every_kth_epoch_and_the_last(tmp_path):
    metrics = train(spec(epochs=5, eval_every=2), str(tmp_path / "run"), data=ragged_data())
    assert [m["epoch"] for m in metrics if "test_elbo" in m] == [2, 4, 5]
    assert all("train_objective" in m and "train_s" in m for m in metrics)


def test_the_hrssm_trains_and_imputes_on_ragged_data(tmp_path):
    from inference.recipes.registry import get_recipe

    config, _ = get_recipe("hrssm").example()
    metrics = train(RunSpec("hrssm", replace(config, max_segments=3, max_length=3),
                            TrainConfig(epochs=2, batch_size=5, progress=False, train_eval_size=10)),
                    str(tmp_path / "run"), data=ragged_data())
    assert [m["epoch"] for m in metrics] == [1, 2] and "test_elbo_per_step" in metrics[-1]
    assert 1 <= metrics[-1]["mean_segments"] <= 3


def test_the_kvae_trains_and_imputes_on_ragged_data(tmp_path):
    from inference.recipes.kvae import KVAEOptions
    from pyro_models.kvae import KVAEConfig

    config = KVAEConfig(a_dim=2, state_dim=3, num_bases=2, lstm_hidden=8, mlp_hidden=(8,))
    metrics = train(RunSpec("kvae", config, TrainConfig(epochs=2, batch_size=5, progress=False, train_eval_size=10),
                            options=KVAEOptions(warm_start_steps=0)), str(tmp_path / "run"), data=ragged_data())
    assert [m["epoch"] for m in metrics] == [1, 2] and "test_elbo_per_step" in metrics[-1]
    assert metrics[-1]["impute_smooth"] is not None


def test_the_command_line_trains_on_a_music_folder_and_scores_its_likelihood(music, tmp_path):
    folder, _ = music
    out = str(tmp_path / "run")
    common = [sys.executable, "scripts/train.py", "dmm", "--data", "jsb", "--data-dir", folder, "--z-dim", "3",
              "--rnn-dim", "8", "--transition-dim", "8", "--emission-hidden", "8", "--batch-size", "4", "--epochs", "2",
              "--no-progress", "--out", out]
    result = subprocess.run(common, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert os.path.isfile(os.path.join(out, "best.pt"))
    score = subprocess.run([sys.executable, "scripts/evaluate.py", "likelihood", "--run", out, "-k", "3", "--split", "test"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert score.returncode == 0, score.stderr
    result = json.load(open(os.path.join(out, "likelihood.json")))
    assert result["k"] == 3 and result["split"] == "test" and result["checkpoint"] == "best"
    assert result["nll_per_step"] > 0 and result["neg_elbo_per_step"] >= result["nll_per_step"] - 1e-9
    imputed = subprocess.run([sys.executable, "scripts/impute.py", "--run", out, "--mask", "random", "--metric", "mse"],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert imputed.returncode == 0, imputed.stderr
    rows = json.load(open(os.path.join(out, "imputation_random.json")))["rows"]
    assert all({"posterior_mean", "floor_mean_frame", "floor_last_observed"} <= set(r) for r in rows)
    curve = subprocess.run([sys.executable, "benchmarks/wall_time_curve.py", "--run", out, "--reference", "paper=6.9"],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert curve.returncode == 0, curve.stderr
    points = json.load(open(os.path.join(out, "wall_time_curve.json")))["points"]
    assert [p["epoch"] for p in points] == [1, 2] and os.path.isfile(os.path.join(out, "figures", "nll_vs_wall_time.png"))
    slow = subprocess.run([sys.executable, "benchmarks/denormals.py", "--run", out, "--rounds", "1", "--out",
                           os.path.join(out, "denormals.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert slow.returncode == 0, slow.stderr
    assert json.load(open(os.path.join(out, "denormals.json")))["rounds"][0]["flush_on_s"] > 0
    cpu = subprocess.run([sys.executable, "benchmarks/wall_time_curve.py", "--run", out, "--clock", "cpu"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert cpu.returncode == 0, cpu.stderr
    hours = [p["hours"] for p in json.load(open(os.path.join(out, "cpu_time_curve.json")))["points"]]
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert hours[-1] * 3600 == pytest.approx(sum(m["cpu_s"] for m in metrics)) and 0 < hours[0] < hours[1]


def test_the_frame_floors_and_the_pyro_comparison_run_with_tiny_arguments(music, tmp_path):
    folder, _ = music
    out = str(tmp_path / "floors.json")
    result = subprocess.run([sys.executable, "benchmarks/frame_floors.py", "--data", "jsb", "--data-dir", folder,
                             "--epochs", "1", "-k", "3", "--z-dim", "2", "--hidden", "8", "--out", out],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = json.load(open(out))["rows"]
    assert rows[0]["exact"] and all(r["nll_per_step"] > 0 for r in rows)
    refused = subprocess.run([sys.executable, "benchmarks/dmm_vs_pyro.py", "--pyro-dir", str(tmp_path), "--data-dir", folder],
                             cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "--pyro-dir: expected a checkout" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_imputation_of_ragged_sequences_leaves_the_steps_past_their_ends_alone():
    from pyro_models.dmm import build_dmm, impute

    model, guide = build_dmm((6,), TINY_DMM)
    data = ragged_data()
    x, lengths = data.test, data.test_lengths
    mask = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(0)) > 0.5
    result = impute(model, guide, x, mask, num_samples=2, lengths=lengths)
    past = torch.arange(8) >= lengths.unsqueeze(-1)
    assert torch.equal(result.imputed[past], x[past]) and torch.equal(result.samples[:, past], x[past].expand(2, -1, -1))
    filled = ~mask & ~past
    assert not torch.equal(result.imputed[filled], x[filled])
    assert not result.mask[past].any()  # no step past an end counts as observed
