"""kill -9 at any stage of a run (an optimiser step, a checkpoint write, the KVAE warm start), then the
same command again: the run finishes with the metrics of an uninterrupted run, no epoch lost or twice.
The kills come from fail points (``inference/runs/failpoints.py``), so each lands exactly where it should."""
import json
import os
import signal
import subprocess
import sys

import pytest

from inference.training import TIMINGS
from inference.runs.failpoints import ENV

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
        return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in f]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, once per model."""
    runs = {}
    for name, args in (("vae", VAE), ("kvae", KVAE)):
        out = tmp_path_factory.mktemp("reference") / name
        extra = ["--cache-dir", str(out.parent / "cache")] if name == "kvae" else []
        assert train(args + extra, out).returncode == 0
        runs[name], runs[f"{name}_dir"] = metrics(out), str(out)
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


def start(args, out, failpoint):
    env = {**{k: v for k, v in os.environ.items() if k != ENV}, ENV: failpoint}
    cmd = [sys.executable, "scripts/train.py", *args, "--no-progress", "--out", str(out)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_stopped(process, timeout=120):
    """Until ``process`` has stopped itself (SIGSTOP at its fail point)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(f"/proc/{process.pid}/stat") as f:
            if f.read().split(")")[-1].split()[0] == "T":
                return
        time.sleep(0.1)
    raise AssertionError("the first training never reached its fail point")


def test_a_second_training_into_a_busy_folder_is_refused_and_a_killed_owner_blocks_nothing(tmp_path, reference):
    out = tmp_path / "run"
    owner = start(VAE, out, "step:9:stop")  # halted in epoch 2, holding the folder
    try:
        wait_stopped(owner)
        second = train(VAE, out)
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and f"{out} is being written by another training (process {owner.pid})" in second.stderr
        assert metrics(out) == reference["vae"][:1]  # the owner's epoch 1, untouched by the second
    finally:
        owner.kill()
        owner.wait()
    again = train(VAE, out)  # the owner died: its lock went with it
    assert again.returncode == 0, again.stderr
    assert metrics(out) == reference["vae"]


def test_ctrl_c_stops_between_steps_in_one_line_and_the_run_continues(tmp_path, reference):
    out = tmp_path / "run"
    interrupted = train(VAE, out, "step:9:interrupt")  # Ctrl-C in epoch 2
    assert interrupted.returncode == 130, interrupted.stderr
    assert interrupted.stderr.strip().count("\n") == 0, interrupted.stderr
    assert f"interrupted in epoch 2: {out}/checkpoint.pt (epoch 1) is kept" in interrupted.stderr
    again = train(VAE, out)
    assert again.returncode == 0, again.stderr
    assert metrics(out) == reference["vae"]


def test_a_torn_metrics_line_is_dropped_and_the_run_continues(tmp_path, reference):
    out = tmp_path / "run"
    assert train(VAE, out, "step:13").returncode == -signal.SIGKILL  # killed in epoch 3: epochs 1-2 kept
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"epoch": 3, "train_obj')  # an append cut short (a kill or a full disk)
    again = train(VAE, out)
    assert again.returncode == 0, again.stderr
    assert metrics(out) == reference["vae"]


def mount_tmpfs(folder, kib):
    """A tmpfs of ``kib`` KiB at ``folder`` (root only: skips the test elsewhere)."""
    folder.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    return folder


@pytest.fixture
def small_disk(tmp_path):
    yield mount_tmpfs(tmp_path / "disk", 512)
    subprocess.run(["umount", "-l", str(tmp_path / "disk")], capture_output=True)


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_good_one(tmp_path, reference):
    size = os.path.getsize(os.path.join(reference["vae_dir"], "checkpoint.pt"))
    disk = mount_tmpfs(tmp_path / "disk", int(1.6 * size) // 1024)  # room for one checkpoint, not for two
    try:
        out = disk / "run"
        result = train(VAE, out)
        assert result.returncode == 2, result.stderr
        line = result.stderr.strip()
        assert "\n" not in line and "No space left on device" in line and "checkpoint.pt holds epoch 1" in line, line
        assert json.loads(open(os.path.join(out, "state.json")).read())["epoch"] == 1
        assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def test_a_read_only_out_is_refused_before_any_work(small_disk):
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    result = train(VAE, small_disk / "run")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "cannot be written" in result.stderr and "read-only" in result.stderr
