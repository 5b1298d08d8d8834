"""The catalogue of bad inputs: each one, tried as a new user would, ends with a non-zero exit and one
line naming the argument (no traceback, no run folder left behind), or with a clear exception from the
library naming the Python argument."""
import gzip
import os
import runpy
import sys

import numpy as np
import pyro
import pytest
import torch

from inference.runs.experiment import RunSpec, train
from inference.trainer import TrainConfig
from pyro_models.datasets import ImageData, SequenceData, check_images
from pyro_models.datasets.configs import ImageDataConfig
from pyro_models.vae import VAEConfig, build_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_VAE = ["--z-dim", "2", "--hidden-dims", "8", "--epochs", "1", "--no-progress"]


def run_script(script, argv, capsys):
    """``scripts/SCRIPT argv`` in this process: (exit code, stderr)."""
    old = sys.argv
    sys.argv = [script, *argv]
    try:
        runpy.run_path(os.path.join(ROOT, "scripts", script), run_name="__main__")
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code if isinstance(exit_info.code, int) else 1
    finally:
        sys.argv = old
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad files a user might hand in, and one finished VAE run."""
    root = tmp_path_factory.mktemp("files")
    (root / "junk.npz").write_text("not an archive")
    np.save(root / "single.npy", np.zeros(3))
    os.rename(root / "single.npy", root / "single.npz")
    np.savez(root / "no_images.npz", pictures=np.zeros((4, 5, 5)))
    np.savez(root / "big_values.npz", images=np.full((6, 5, 5), 255.0))
    np.savez(root / "one_frame.npz", sequences=np.random.default_rng(0).random((10, 1, 6)))
    (root / "mnist").mkdir()
    with gzip.open(root / "mnist" / "t10k-images-idx3-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x08\x03" + b"\x00" * 20)
    truncated = (root / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes()[:-8]
    (root / "mnist" / "t10k-images-idx3-ubyte.gz").write_bytes(truncated)
    (root / "a_file").write_text("x")
    sequences = np.random.default_rng(0).random((8, 5, 6))
    np.savez(root / "unobserved.npz", sequences=sequences, mask=np.zeros((8, 5), dtype=bool))
    (root / "not_an_object.json").write_text("[1, 2, 3]")
    pyro.clear_param_store()
    train(RunSpec("vae", VAEConfig(z_dim=2, hidden_dims=(8,)), TrainConfig(epochs=1, progress=False, batch_size=10),
                  ImageDataConfig(data="shapes", num_shapes=40)), str(root / "vae_run"))
    corrupt = root / "corrupt_run"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((root / "vae_run" / "config.json").read_text())
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (corrupt / name).write_bytes(b"garbage")
    return root


TRAIN_CASES = [
    (["kvae", "--z-dim", "3"], "--z-dim does not apply to kvae"),
    (["kvae", "--guide", "iaf"], "--guide"),
    (["kvae", "--kl-schedule", "free-bits"], "--kl-schedule does not apply to kvae"),
    (["hrssm", "--update-kl-gradient", "2"], "--update-kl-gradient: expected in [0, 1]"),
    (["hrssm", "--max-length", "0"], "--max-length: expected >= 1"),
    (["hrssm", "--boundary-kernel", "2"], "--boundary-kernel: expected an odd size"),
    (["hrssm", "--no-boundaries", "--boundary-warmup-steps", "1250"], "--boundary-warmup-steps: applies to boundaries only"),
    (["hrssm", "--no-boundaries", "--copy-step-every", "8"], "--copy-step-every: applies to boundaries only"),
    (["hrssm", "--copy-step-every", "1"], "--copy-step-every: expected 0 (off) or >= 2"),
    (["hrssm", "--check-every-step"], "--check-every-step: Pyro's argument checks do not run inside a compiled loss"),
    (["kvae", "--jit"], "--jit: kvae cannot be compiled"),
    (["dmm", "--guide", "made-up"], "--guide"),
    (["dmm", "--kl-annealing-epochs", "3", "--jit"], "--jit: dmm cannot be compiled"),
    (["vae", "--lr", "inf"], "--lr"),
    (["vae", "--lr", "-1"], "--lr: expected a finite number > 0"),
    (["vae", "--lr-decay", "0"], "--lr-decay: expected in (0, 1]"),
    (["vae", "--lr-decay", "-1"], "--lr-decay: expected in (0, 1]"),
    (["vae", "--clip-norm", "0"], "--clip-norm"),
    (["vae", "--seed", "-1"], "--seed: expected an integer in [0, 2**32)"),
    (["vae", "--seed", str(2**40)], "--seed: expected an integer in [0, 2**32), got 1099511627776"),
    (["vae", "--seed", str(2**64)], "--seed: expected an integer of at most 64 bits"),
    (["vae", "--hidden-dims", "100000000000"], "--hidden-dims"),
    (["vae", "--device", "nonsense"], "--device"),
    (["vae", "--device", "cuda"], "--device"),
    (["vae", "--channels", "8,16"], "--channels does not apply to vae (it is a flag of conv-vae)"),
    (["conv-vae", "--hidden-dims", "8"], "--hidden-dims does not apply to conv-vae (it is a flag of vae)"),
    (["vae", "--epochs", "0"], "--epochs: expected >= 1"),
    (["vae", "--batch-size", "0"], "--batch-size: expected >= 1"),
    (["vae", "--num-particles", "0"], "--num-particles: expected >= 1"),
    (["vae", "--elbo", "exact"], "--elbo"),
    (["vae", "--hidden-dims", ""], "--hidden-dims: expected one or more widths"),
    (["vae", "--hidden-dims", "a,b"], "--hidden-dims"),
    (["vae", "--z-dim", "0"], "--z-dim: expected >= 1"),
    (["vae", "--guide", "iaf", "--num-flows", "0"], "--num-flows: the 'iaf' guide needs"),
    (["vae", "--guide", "iaf", "--kl-schedule", "free-bits"], "--kl-schedule, --guide"),
    (["vae", "--free-bits-target", "0"], "--free-bits-target: expected > 0"),
    (["vae", "--num-shapes", "1"], "--num-shapes: expected >= 2"),
    (["vae", "--data", "npz"], "--data-path"),
    (["vae", "--data", "mnist", "--no-download"], "--data-dir"),
    (["kvae", "--data", "shapes"], "--data"),
    (["kvae", "--num-sequences", "0"], "--num-sequences: expected >= 1"),
    (["dmm", "--num-steps", "1"], "--num-steps: expected >= 2"),
    (["dmm", "--transpose-semitones", "-1"], "--transpose-semitones: expected >= 0, got -1"),
    (["dmm", "--emission-dropout", "0.2", "--frame-network", "conv", "--num-sequences", "4", "--num-steps", "3",
      "--cache-dir", "{tmp}/cache"], "--emission-dropout: applies to the MLP emission, not to the convolutional"),
    (["dmm", "--transpose-semitones", "2", "--num-sequences", "4", "--num-steps", "3", "--cache-dir", "{tmp}/cache"],
     "--transpose-semitones: applies to piano-roll frames (keys,), got frames of shape (1, 32, 32)"),
    (["hrssm", "--num-steps", "50", "--num-sequences", "4", "--cache-dir", "{tmp}/cache"], "--max-segments, --max-length: sequences of T = 50"),
    (["kvae", "--warm-start-steps", "-1"], "--warm-start-steps: expected >= 0"),
    (["nonsense"], "model: expected one of"),
    (["vae", "--epochs"], "--epochs"),
    (["vae", "extra"], "unexpected argument"),
]


@pytest.mark.parametrize("argv, fragment", TRAIN_CASES, ids=[" ".join(c[0]) for c in TRAIN_CASES])
def test_train_refuses_bad_flags_before_any_work(argv, fragment, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_script("train.py", [a.format(tmp=tmp_path) for a in argv] + ["--out", str(out)], capsys)
    assert code == 2 and fragment in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()


FILE_CASES = [
    (["vae", "--data", "npz", "--data-path", "{root}/missing.npz"], "--data-path: no such file"),
    (["vae", "--data", "npz", "--data-path", "{root}/junk.npz"], "is not a zip file"),
    (["vae", "--data", "npz", "--data-path", "{root}/single.npz"], "holds a single array"),
    (["vae", "--data", "npz", "--data-path", "{root}/no_images.npz"], "expected an array named 'images'"),
    (["vae", "--data", "npz", "--data-path", "{root}/big_values.npz"], "values must lie in [0, 1]"),
    (["kvae", "--data", "npz", "--data-path", "{root}/one_frame.npz"], "--data: kvae needs sequences of >= 2 frames"),
    (["vae", "--data", "mnist", "--data-dir", "{root}/mnist", "--no-download"], "unreadable"),
    (["dmm", "--data", "npz", "--data-path", "{root}/unobserved.npz"], "train_mask observes no frame"),
    (["vae", "--config", "{root}/not_an_object.json"], "--config: {root}/not_an_object.json is not a run's config.json"),
]


@pytest.mark.parametrize("argv, fragment", FILE_CASES, ids=[c[0][-1].split("/")[-1] for c in FILE_CASES])
def test_train_refuses_bad_files_in_one_line(argv, fragment, files, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = run_script("train.py", [a.format(root=files) for a in argv] + TINY_VAE[4:] + ["--out", str(out)], capsys)
    assert code == 2 and fragment.format(root=files) in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not out.exists()  # checked before the folder is made


@pytest.mark.parametrize("out, fragment", [
    ("{root}/a_file", "--out: {root}/a_file exists and is not a folder"),
    ("{root}/corrupt_run", "holds another run whose checkpoints are unreadable"),
])
def test_train_refuses_bad_out(out, fragment, files, capsys):
    code, err = run_script("train.py", ["vae", *TINY_VAE, "--out", out.format(root=files)], capsys)
    assert code == 2 and fragment.format(root=files) in err and err.count("\n") == 1, err


def test_resume_from_corrupt_checkpoints_is_one_line(files, capsys):
    code, err = run_script("train.py", ["vae", *TINY_VAE, "--batch-size", "10", "--data", "shapes", "--out",
                                        str(files / "corrupt_run"), "--resume"], capsys)
    assert code == 2 and err.count("\n") == 1 and "unreadable" in err, err  # nothing to continue: not restarted


@pytest.mark.parametrize("script, argv, fragment", [
    ("impute.py", ["--run", "{root}/nowhere"], "--run: {root}/nowhere holds no run"),
    ("impute.py", ["--run", "{root}/vae_run", "--mask", "consecutive"], "--mask: expected one of ('random', 'bottom-half')"),
    ("impute.py", ["--run", "{root}/vae_run", "--num-test", "-7"], "--num-test: expected >= 0, got -7"),
    ("impute.py", ["--run", "{root}/vae_run", "--batch-size", "0"], "--batch-size: expected >= 1"),
    ("impute.py", ["--run", "{root}/corrupt_run"], "no readable checkpoint"),
    ("evaluate.py", ["boundaries", "--run", "{root}/vae_run"], "holds a vae run; boundaries evaluates hrssm runs"),
    ("evaluate.py", ["boundaries", "--run", "{root}/vae_run", "--num-test", "0"], "--num-test: expected >= 1"),
    ("evaluate.py", ["boundaries", "--run", "{root}/vae_run", "--threshold", "1.5"], "--threshold: expected in (0, 1), got 1.5"),
    ("evaluate.py", ["nonsense", "--run", "{root}/vae_run"], "invalid choice"),
    ("demo.py", ["--num-impute", "-1", "--out", "{root}/demo"], "--num-impute: expected >= 0, got -1"),
    ("demo.py", ["--epochs", "0", "--out", "{root}/demo"], "--epochs: expected >= 1, got 0"),
    ("demo.py", ["--model", "hrssm", "--out", "{root}/demo"], "--model"),
])
def test_evaluation_scripts_refuse_bad_input_in_one_line(script, argv, fragment, files, capsys):
    code, err = run_script(script, [a.format(root=files) for a in argv], capsys)
    assert code == 2 and fragment.format(root=files) in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err


def test_library_errors_name_python_arguments():
    model, guide = build_vae((1, 4, 4), VAEConfig(z_dim=2, hidden_dims=(8,)), "vae")
    with pytest.raises(ValueError, match=r"x: the Bernoulli likelihood needs values in \[0, 1\], got min 0, max 255"):
        model(torch.full((2, 1, 4, 4), 255.0).index_fill_(0, torch.tensor([0]), 0.0))
    with pytest.raises(ValueError, match="lr: expected a finite number > 0, got nan"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(ValueError, match="check_every_step: .* expected jit False with it, got jit True"):
        TrainConfig(jit=True, check_every_step=True)  # the checks would silently not run
    with pytest.raises(ValueError, match="x: expected shape"):
        model(torch.rand(2, 1, 5, 5))


def test_builders_and_imputers_refuse_bad_shapes_naming_the_argument():
    from pyro_models.dmm import DMMConfig, build_dmm
    from pyro_models.hrssm import HRSSMConfig, build_hrssm
    from pyro_models.kvae import KVAEConfig, build_kvae
    from pyro_models.dmm import impute as dmm_impute
    from pyro_models.hrssm import impute as hrssm_impute
    from pyro_models.kvae import impute as kvae_impute
    from pyro_models.vae import impute as vae_impute

    for build, argument in ((lambda s: build_vae(s, VAEConfig(), "vae"), "x_shape"),
                            (lambda s: build_kvae(s, KVAEConfig()), "frame_shape"),
                            (lambda s: build_dmm(s, DMMConfig()), "frame_shape"),
                            (lambda s: build_hrssm(s, HRSSMConfig()), "frame_shape")):
        for shape in ((1, -28, 28), (-3,), (0, 4, 4)):
            if argument == "x_shape" and len(shape) == 1:
                continue
            with pytest.raises(ValueError, match=rf"^{argument}: expected .* with positive sizes, got"):
                build(shape)
    model, guide = build_kvae((6,), KVAEConfig(a_dim=2, state_dim=2, num_bases=1, lstm_hidden=4))
    x = torch.rand(2, 5, 7)  # frames of 7 values for a model of 6
    with pytest.raises(ValueError, match=r"^x: expected shape \(batch, T, 6\), got \(2, 5, 7\)"):
        kvae_impute(model, guide, x, torch.ones(2, 5, dtype=torch.bool))
    assert all(callable(f) for f in (dmm_impute, hrssm_impute, kvae_impute, vae_impute))  # every model's imputer by one name


def test_a_last_batch_of_one_never_reaches_batch_norm(tmp_path):
    """A conv VAE (batch norm) on 21 training images in batches of 10: the last one joins the batch before."""
    from inference.training.loop import batch_slices

    assert batch_slices(21, 10) == [slice(0, 10), slice(10, 21)] and batch_slices(1, 10) == [slice(0, 1)]
    assert batch_slices(20, 10) == [slice(0, 10), slice(10, 20)] and batch_slices(22, 10)[-1] == slice(20, 22)
    images = torch.rand(24, 1, 8, 8)
    history = train(RunSpec("conv-vae", VAEConfig(z_dim=2, channels=(4, 8)), TrainConfig(epochs=1, batch_size=10, progress=False)),
                    None, data=ImageData(images[:21], images[21:], "random"))
    assert np.isfinite(history[-1]["test_elbo"])


def test_hrssm_takes_several_particles(tmp_path):
    """The HRSSM's programs do not broadcast over a particle dimension: its particles are drawn one by one."""
    from inference.recipes.registry import recipes

    recipe = recipes()["hrssm"]
    config, shape = recipe.example()
    x = torch.rand((6,) + tuple(shape))
    history = train(RunSpec("hrssm", config, TrainConfig(epochs=1, batch_size=3, num_particles=2, progress=False,
                                                         train_eval_size=3, eval_batch_size=3)),
                    None, data=SequenceData(x[:4], x[4:], "random"))
    assert np.isfinite(history[-1]["test_elbo"])


def test_data_that_changed_under_a_run_are_refused_in_one_line(tmp_path, capsys):
    first = tmp_path / "a.npz"
    np.savez(first, images=np.random.default_rng(0).random((30, 1, 6, 6)))
    out = str(tmp_path / "run")
    argv = ["vae", *TINY_VAE, "--batch-size", "10", "--data", "npz", "--data-path", str(first), "--out", out]
    assert run_script("train.py", argv, capsys)[0] == 0
    np.savez(first, images=np.random.default_rng(0).random((30, 1, 8, 8)))  # replaced by images of another size
    code, err = run_script("train.py", argv[:-2] + ["--epochs", "2", "--out", out, "--resume"], capsys)
    assert code == 2 and err.count("\n") == 1, err
    assert "was trained on examples of shape (1, 6, 6), but the data now hold examples of shape (1, 8, 8)" in err
    code, err = run_script("impute.py", ["--run", out], capsys)
    assert code == 2 and err.count("\n") == 1 and "(1, 8, 8)" in err, err


def test_channels_last_images_are_read_as_channels():
    images = np.random.default_rng(0).random((4, 10, 8, 3))
    assert check_images(images).shape == (4, 3, 10, 8)
    assert check_images(np.random.default_rng(0).random((4, 3, 10, 8))).shape == (4, 3, 10, 8)
    with pytest.raises(ValueError, match="1 or 3 channels"):
        check_images(np.zeros((4, 10, 8, 5)))


def test_one_training_sequence_trains_and_reports(tmp_path, capsys):
    # A degenerate but valid request ends with a correct result, not a crash after the work is done.
    out = tmp_path / "run"
    code, err = run_script("train.py", ["kvae", "--num-sequences", "1", "--num-steps", "6", "--decoder-channels", "8",
                                        "--epochs", "1", "--warm-start-steps", "2", "--dynamics-fit-steps", "2", "--dynamics-lstm-steps", "2",
                                        "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--out", str(out)], capsys)
    assert code == 0, err
    metrics = (out / "metrics.jsonl").read_text()
    assert "NaN" not in metrics and "impute_smooth" in metrics  # no frame missing at T = 6: null, not NaN
