"""kill -9 at any stage of a run (an optimiser step, a checkpoint write, the KVAE warm start), then the
same command again: the run finishes with the metrics of an uninterrupted run, no epoch lost or twice.
The kills come from fail points (``inference/failpoints.py``), so each lands exactly where it should."""
import json
import os
import signal
import subprocess
import sys

import pytest

from inference.failpoints import ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VAE = ["vae", "--data", "shapes", "--num-shapes", "120", "--z-dim", "3", "--hidden-dims", "16", "--batch-size", "20",
       "--epochs", "3", "--kl-schedule", "linear"]
KVAE = ["kvae", "--num-sequences", "10", "--num-steps", "6", "--decoder-channels", "8", "--epochs", "2", "--batch-size", "5",
        "--warm-start-steps", "4", "--dynamics-fit-steps", "3", "--dynamics-lstm-steps", "3", "--lstm-frozen-epochs", "1"]


def train(args, out, failpoint=None):
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if failpoint:
        env[ENV] = failpoint
    cmd = [sys.executable, "scripts/train.py", *args, "--no-progress", "--out", str(out)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in ("time_s", "train_s")} for line in f]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, once per model."""
    runs = {}
    for name, args in (("vae", VAE), ("kvae", KVAE)):
        out = tmp_path_factory.mktemp("reference") / name
        extra = ["--cache-dir", str(out.parent / "cache")] if name == "kvae" else []
        assert train(args + extra, out).returncode == 0
        runs[name] = metrics(out)
    return runs


@pytest.mark.parametrize("name, failpoint, resume", [
    ("vae", "step:3", False),         # epoch 1, before any checkpoint: the folder holds config.json only
    ("vae", "step:9", False),         # epoch 2, after the first checkpoint
    ("vae", "step:9", True),
    ("vae", "checkpoint:2", False),   # epoch 2's checkpoint half done (its metrics line already written)
    ("kvae", "warm_start:3", True),   # the KVAE warm start, before any epoch
    ("kvae", "checkpoint:1", False),
])
def test_kill_then_the_same_command_finishes_the_run(tmp_path, reference, name, failpoint, resume):
    args = (VAE if name == "vae" else KVAE) + (["--cache-dir", str(tmp_path / "cache")] if name == "kvae" else [])
    out = tmp_path / "run"
    killed = train(args, out, failpoint)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    again = train(args + (["--resume"] if resume else []), out)
    assert again.returncode == 0, again.stderr
    assert metrics(out) == reference[name]  # every epoch once, with the uninterrupted run's values
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
