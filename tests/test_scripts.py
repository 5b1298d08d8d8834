"""Every script and benchmark smoke-runs in seconds with tiny arguments."""
import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gloo_retry import GLOO_ABORT, run_with_retry  # tests/gloo_retry.py
from inference.training import TIMINGS
from inference.cli.command_line import parse_train_args
from inference.recipes.registry import recipes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, ok=True):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if ok:
        assert result.returncode == 0, result.stdout + result.stderr
    return result


@pytest.mark.parametrize("model, extra", [
    ("vae", ["--hidden-dims", "16", "--guide", "iaf", "--kl-schedule", "linear", "--binarize", "dynamic"]),
    ("conv-vae", ["--channels", "4,8", "--kl-schedule", "free-bits", "--elbo", "meanfield", "--likelihood", "gaussian"]),
])
def test_train_script(tmp_path, model, extra):
    out = str(tmp_path / "run")
    common = ["scripts/train.py", model, "--data", "shapes", "--num-shapes", "60", "--z-dim", "3",
              "--batch-size", "16", "--no-progress", "--out", out, *extra]
    run(*common, "--epochs", "1")
    # --resume reads the run's flags from its config.json: only what changes is given again
    result = run("scripts/train.py", model, "--out", out, "--epochs", "2", "--resume", "--no-progress")
    assert "epoch 2" in result.stdout
    mismatch = run("scripts/train.py", model, "--out", out, "--resume", "--z-dim", "4", ok=False)
    assert mismatch.returncode == 2 and "z_dim" in mismatch.stderr.replace("-", "_"), mismatch.stderr
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["epoch"] for m in metrics] == [1, 2]


@pytest.mark.parametrize("model", sorted(recipes()))
def test_train_help_lists_every_flag(model, capsys):
    # argparse formats help texts with %: a field comment such as "6-8% of a step" once broke --help
    with pytest.raises(SystemExit) as stop:
        parse_train_args([model, "--help"], "train.py")
    assert stop.value.code == 0
    shown = capsys.readouterr().out
    assert "--amsgrad" in shown and "--epochs" in shown and "(default: " in shown


def _metrics(folder):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in open(os.path.join(folder, "metrics.jsonl"))]


def test_train_script_repeats_a_stored_run_from_its_config(tmp_path, capsys):
    first = str(tmp_path / "first")
    run("scripts/train.py", "vae", "--data", "shapes", "--num-shapes", "40", "--z-dim", "3", "--hidden-dims", "16",
        "--batch-size", "16", "--binarize", "dynamic", "--epochs", "1", "--seed", "4", "--no-progress", "--out", first)
    run("scripts/train.py", "--config", os.path.join(first, "config.json"), "--no-progress")  # to first-repeat
    assert _metrics(first + "-repeat") == _metrics(first)  # the same metrics, to the last digit
    longer = str(tmp_path / "longer")
    run("scripts/train.py", "--config", first, "--epochs", "2", "--seed", "5", "--no-progress", "--out", longer)
    stored = json.load(open(os.path.join(longer, "config.json")))
    assert stored["train"]["epochs"] == 2 and stored["train"]["seed"] == 5 and stored["config"]["z_dim"] == 3
    assert len(_metrics(longer)) == 2 and _metrics(longer)[0] != _metrics(first)[0]  # the flags override
    with pytest.raises(SystemExit) as stopped:  # parsed in this process: the one-line error of a wrong model
        parse_train_args(["kvae", "--config", first], "")
    assert stopped.value.code == 2 and capsys.readouterr().err.strip() == f"error: model: {first} is a vae run, got 'kvae'"


def test_train_script_npz_and_errors(tmp_path):
    path = tmp_path / "mine.npz"
    np.savez(path, images=np.random.default_rng(0).random((30, 10, 10)))
    run("scripts/train.py", "vae", "--data", "npz", "--data-path", str(path), "--epochs", "1", "--z-dim", "2",
        "--hidden-dims", "8", "--no-progress", "--out", str(tmp_path / "run"))
    missing = run("scripts/train.py", "vae", "--data", "mnist", "--data-dir", str(tmp_path / "nowhere"), "--no-download",
                  "--out", str(tmp_path / "r2"), ok=False)
    assert missing.returncode != 0 and "MNIST" in missing.stderr
    unknown = run("scripts/train.py", "vae", "--guide", "made-up", "--out", str(tmp_path / "r3"), ok=False)
    assert unknown.returncode == 2 and "--guide" in unknown.stderr


@pytest.mark.parametrize("argv, words", [  # in a real process (the catalogue, in-process: test_bad_inputs.py)
    (["kvae", "--z-dim", "3"], "--z-dim does not apply to kvae"),
    (["kvae", "--jit"], "--jit: kvae cannot be compiled"),
])
def test_train_script_bad_flags_are_one_line_errors(tmp_path, argv, words):
    result = run("scripts/train.py", *argv, "--out", str(tmp_path / "run"), ok=False)
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert not os.path.exists(tmp_path / "run")  # refused before any work


def test_kvae_demo_train_and_impute_scripts(tmp_path):
    # The demo trains a KVAE and runs scripts/impute.py (random masks) on its run directory.
    result = run("scripts/demo.py", "--out", str(tmp_path / "demo"), "--epochs", "1", "--num-sequences", "12",
                 "--decoder-channels", "8", "--num-impute", "3", "--warm-start-steps", "2", "--dynamics-fit-steps", "2",
                 "--dynamics-lstm-steps", "2",
                 "--cache-dir", str(tmp_path / "cache"))
    assert "smoothing" in result.stdout
    (run_dir,) = os.listdir(tmp_path / "demo")
    run_dir = tmp_path / "demo" / run_dir
    rows = json.load(open(run_dir / "imputation_random.json"))["rows"]
    assert [r["setting"] for r in rows] == [round(0.1 * i, 1) for i in range(1, 11)]
    assert all(0 <= r["smoothing"] <= 1 and 0 <= r["floor_majority_frame"] <= 1 for r in rows)
    for name in ("imputation_random.png", "imputation_random_strip.png", "alpha_epoch001.png", "a_trajectories_epoch001.png"):
        assert (run_dir / "figures" / name).exists()
    result = run("scripts/impute.py", "--run", str(run_dir), "--mask", "consecutive", "--num-test", "2")
    assert "consecutive 15" in result.stdout
    out = str(tmp_path / "kvae")
    run("scripts/train.py", "kvae", "--num-sequences", "10", "--num-steps", "6", "--decoder-channels", "8", "--epochs", "1",
        "--batch-size", "5", "--warm-start-steps", "2", "--dynamics-fit-steps", "2", "--dynamics-lstm-steps", "2",
        "--cache-dir", str(tmp_path / "cache"),
        "--no-progress", "--out", out)
    warm = json.load(open(os.path.join(out, "warm_start.json")))
    assert len(warm["code_std"]) == 2 and warm["config"]["autoencoder_steps"] == 2
    assert json.load(open(os.path.join(out, "config.json")))["options"]["warm_start_steps"] == 2
    metrics = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert 0 <= metrics["recon_error"] <= 1 and 0 <= metrics["impute_smooth"] <= 1
    bad = run("scripts/train.py", "kvae", "--data", "shapes", "--out", str(tmp_path / "bad"), ok=False)
    assert bad.returncode == 2 and "--data" in bad.stderr and "shapes" in bad.stderr


def test_demo_script(tmp_path):
    result = run("scripts/demo.py", "--out", str(tmp_path), "--model", "vae", "--epochs", "1")
    assert "held-out ELBO" in result.stdout
    (run_dir,) = os.listdir(tmp_path)
    assert os.path.exists(tmp_path / run_dir / "figures" / "imputation_epoch001.png")


def test_svi_overhead_benchmark(tmp_path):
    out = str(tmp_path / "bench.json")
    result = run("benchmarks/svi_overhead.py", "--data", "shapes", "--num-shapes", "300", "--steps", "4", "--warmup", "1",
                 "--memory-steps", "1", "--out", out)
    assert "ratio" in result.stdout
    payload = json.load(open(out))
    assert payload["ratio_pyro_over_torch"] > 0 and set(payload["memory"]) == {"pyro", "pyro_eager", "torch"}


def test_kvae_step_benchmark(tmp_path):
    out = str(tmp_path / "kvae_step.json")
    result = run("benchmarks/kvae_step.py", "--steps", "1", "--decoder-channels", "8", "--batch-size", "2", "--num-steps", "4", "--out", out)
    assert "of a step" in result.stdout
    assert 0 < json.load(open(out))["lgssm_share"]


@pytest.mark.parametrize("extra", [[], ["--no-boundaries"], ["--data", "color-balls-random"]])
def test_hrssm_train_and_evaluate_scripts(tmp_path, extra):
    out = str(tmp_path / "hrssm")
    run("scripts/train.py", "hrssm", "--num-sequences", "16", "--num-steps", "10", "--belief-size", "16", "--conv-channels", "8",
        "--epochs", "1", "--batch-size", "8", "--temperature-decay-steps", "2", "--update-kl-gradient", "0.5",
        "--cache-dir", str(tmp_path / "cache"),
        "--no-progress", "--out", out, *extra)
    stored = json.load(open(os.path.join(out, "config.json")))
    assert stored["options"]["temperature_decay_steps"] == 2 and stored["config"]["update_kl_gradient"] == 0.5
    metrics = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert {"boundary_f1", "boundary_f1_one_to_one", "mean_segments", "temperature", "test_elbo"} <= set(metrics)
    result = run("scripts/evaluate.py", "boundaries", "--run", out, "--num-test", "3")
    scores = json.load(open(os.path.join(out, "boundaries.json")))
    assert 0 <= scores["boundary_f1_one_to_one"] <= scores["boundary_f1"] <= 1 and scores["num_test"] == 3 and "wrote" in result.stdout
    boundaries = "--no-boundaries" not in extra
    # 2 steps, inside the default warm-up of 1,250: said first; the RSSM baseline has no warm-up
    assert ("warning" in scores and "warm-up" in scores["warning"]) == boundaries
    if boundaries:
        assert set(scores["segmentation_elbo"]) == {"own", "true_events", "none"}
        assert scores["peaks"] and 0 <= scores["argmax"]["boundary_f1"] <= 1 and "boundary_f1_argmax" in metrics
        control = "color-balls-random-constant" if extra else "color-balls-constant"
        assert scores["control"]["data"] == control and 0 <= scores["control"]["boundary_f1"] <= 1
        for where in (scores, scores["control"]):  # colour changes and wall hits, each with its chance level
            assert set(where["cues"]) == {"colour_changes", "wall_hits"}
            assert all(0 <= v <= 1 for cue in where["cues"].values() for v in cue.values())
        if extra:  # the colour changes are the data's events; the wall hits are apart from them
            assert scores["cues"]["colour_changes"]["f1"] == pytest.approx(scores["boundary_f1"])
    figures = ["boundaries_eval.png", "jumpy.png", "boundaries_epoch001.png", "f1_vs_time.png"]
    figures += ["boundary_probabilities.png"] if boundaries else []  # the RSSM has no boundary posterior
    for name in figures:
        assert os.path.exists(os.path.join(out, "figures", name)), name


def test_hrssm_step_benchmark(tmp_path):
    out = str(tmp_path / "hrssm_step.json")
    result = run("benchmarks/hrssm_step.py", "--steps", "1", "--belief-size", "16", "--conv-channels", "8", "--batch-size", "2",
                 "--num-steps", "6", "--out", out)
    assert "steps/s" in result.stdout and json.load(open(out))["steps_per_second"] > 0


def test_mnist_benchmarks(tmp_path, fake_mnist_dir):
    out = str(tmp_path / "mnist.json")
    run("benchmarks/mnist_vae.py", "--data-dir", str(fake_mnist_dir), "--epochs", "1", "--seeds", "0",
        "--runs", str(tmp_path / "runs"), "--out", out)
    results = json.load(open(out))
    assert {"pyro_normal", "pyro_iaf", "hand_written", "gap_pyro_normal_minus_hand"} <= set(results)
    out = str(tmp_path / "kl.json")
    run("benchmarks/kl_schedules.py", "--data-dir", str(fake_mnist_dir), "--epochs", "1", "--z-dim", "4",
        "--runs", str(tmp_path / "kl_runs"), "--out", out)
    assert set(json.load(open(out))) >= {"none", "linear", "free-bits"}


def test_revisions_benchmark(tmp_path):
    out = str(tmp_path / "revisions.json")
    result = run("benchmarks/revisions.py", "--base", "HEAD", "--key", "median_s.step", "--repeats", "1", "--out", out,
                 "benchmarks/kvae_step.py", "--", "--steps", "1", "--decoder-channels", "8", "--batch-size", "2", "--num-steps", "4")
    assert "current / base" in result.stdout and json.load(open(out))["ratio_current_over_base"] > 0


def test_guides_benchmark(tmp_path):
    out = str(tmp_path / "guides.json")
    run("benchmarks/guides.py", "dmm", "--epochs", "1", "--num-test", "3", "--seeds", "0", "1", "--runs", str(tmp_path / "runs"),
        "--refit-epochs", "1", "--refit-samples", "2", "--out", out, "--", "--num-sequences", "10", "--num-steps", "6", "--z-dim", "3", "--rnn-dim", "8",
        "--transition-dim", "8", "--emission-hidden", "8", "--batch-size", "5", "--cache-dir", str(tmp_path / "cache"))
    result = json.load(open(out))
    rows, summary = result["rows"], result["summary"]
    assert [(r["guide"], r["seed"]) for r in rows] == [(g, s) for s in (0, 1) for g in ("st-r", "st-l", "st-lr", "mf-lr")]
    assert all("impute_hamming_posterior_mean" in r for r in rows)
    for entry in summary:  # mean and range over the two seeds, from the rows
        elbos = [r["test_elbo"] for r in rows if r["guide"] == entry["guide"]]
        assert entry["test_elbo_min"] == min(elbos) and entry["test_elbo_max"] == max(elbos)
        assert abs(entry["test_elbo_mean"] - sum(elbos) / 2) < 1e-9
    refits = result["refits"]  # every guide fitted to every trained model, at each seed
    guides = ("st-r", "st-l", "st-lr", "mf-lr")
    assert [(r["seed"], r["model_trained_with"], r["guide"]) for r in refits] == [
        (s, t, g) for s in (0, 1) for t in guides for g in guides]
    assert all(r["minus_first_guide"] == 0.0 for r in refits if r["guide"] == guides[0])
    assert os.path.exists(tmp_path / "runs" / "dmm" / "guides.png")


def test_hrssm_vs_vta_benchmark(tmp_path):
    """Needs a checkout of the official code (VTA_DIR); the refusal of a folder without it always runs."""
    refused = run("benchmarks/hrssm_vs_vta.py", "--vta-dir", str(tmp_path), ok=False)
    assert refused.returncode != 0 and "--vta-dir" in refused.stderr
    vta = os.environ.get("VTA_DIR")
    if not vta:
        pytest.skip("VTA_DIR (a checkout of taesupkim/vta) not set")
    out = str(tmp_path / "vta.json")
    run("benchmarks/hrssm_vs_vta.py", "--vta-dir", vta, "--rounds", "1", "--init-sizes", "1", "--belief-size", "8", "--out", out)
    assert json.load(open(out))["ours_over_official"]["official_init1"] > 0


def test_model_steps_benchmark(tmp_path):
    out = str(tmp_path / "steps.json")
    run("benchmarks/model_steps.py", "--models", "vae", "dmm", "--steps", "1", "--batch", "2", "--length", "4",
        "--sweep", "width", "0.5", "1", "--out", out)
    rows = json.load(open(out))["rows"]
    assert [(r["model"], r["width"]) for r in rows] == [("vae", 0.5), ("vae", 1.0), ("dmm", 0.5), ("dmm", 1.0)]
    assert rows[0]["parameters"] < rows[1]["parameters"] and all(r["step_s"] > 0 for r in rows)


def test_data_parallel_benchmark(tmp_path):
    out = str(tmp_path / "dp.json")
    result = run("benchmarks/data_parallel.py", "--models", "vae", "--steps", "1", "--warmup", "0", "--batch", "2", "--out", out)
    rows = json.load(open(out))["rows"]
    assert [r["ranks"] for r in rows] == [1, 2] and rows[0]["speedup"] == 1.0 and rows[1]["examples_per_s"] > 0
    assert "2 ranks" in result.stdout


def test_torchrun_trains_one_run_directory(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun is not installed next to this Python")
    out = str(tmp_path / "dp")
    common = ["--nproc_per_node", "2", "scripts/train.py", "vae", "--data", "shapes", "--num-shapes", "40", "--z-dim", "2",
              "--hidden-dims", "8", "--batch-size", "8", "--no-progress", "--out", out]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # (resuming N ranks: tests/test_distributed.py)
    result = run_with_retry([torchrun, *common, "--epochs", "2"], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("done: epoch 2") == 1  # rank 0 reports
    assert [json.loads(line)["epoch"] for line in open(os.path.join(out, "metrics.jsonl"))] == [1, 2]
    assert json.load(open(os.path.join(out, "state.json")))["epoch"] == 2


def test_select_run_script(tmp_path):
    runs = []
    for name, own, none in (("good", -100.0, -130.0), ("bad", -90.0, -91.0)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "boundaries.json").write_text(json.dumps({
            "segmentation_elbo": {"own": own, "true_events": own, "none": none}, "test_elbo": own,
            "boundary_f1": 0.9 if name == "good" else 0.4, "mean_segments": 3.0}))
        runs.append(str(folder))
    assert run("scripts/select_run.py", *runs).stdout.strip().endswith(f"pick (segmentation-gap): {runs[0]}")
    assert run("scripts/select_run.py", *runs, "--rule", "elbo").stdout.strip().endswith(f"pick (elbo): {runs[1]}")
    missing = run("scripts/select_run.py", str(tmp_path), ok=False)
    assert missing.returncode == 2 and "boundaries.json" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.parametrize("message, runs", [(GLOO_ABORT, 2), ("some other failure", 1)])
def test_a_launch_is_retried_once_for_the_gloo_abort_only(tmp_path, message, runs):
    counter = tmp_path / "count"
    script = f"import sys; f = open({str(counter)!r}, 'a'); f.write('x'); f.close(); sys.exit({message!r})"
    with pytest.warns(UserWarning) if runs == 2 else contextlib.nullcontext():
        result = run_with_retry([sys.executable, "-c", script], capture_output=True, text=True, env=dict(os.environ))
    assert result.returncode == 1 and counter.read_text() == "x" * runs


def test_hrssm_events_benchmark(tmp_path):
    out, runs = str(tmp_path / "events.json"), tmp_path / "runs"
    extra = f"--num-sequences 24 --epochs 1 --belief-size 8 --conv-channels 8 --state-size 2 --cache-dir {tmp_path / 'cache'}"
    run("benchmarks/hrssm_events.py", "--variants", "default", "no-observation-colour", "--seeds", "0", "--num-test", "8",
        "--runs", str(runs), "--out", out, "--extra", extra)
    result = json.load(open(out))
    for variant in ("default", "no-observation-colour"):
        row = result["variants"][variant]["rows"]["0"]
        assert 0 <= row["f1_colour_changes"] <= 1 and row["segments"] >= 2  # 20 frames, at most 16 a segment
    stored = json.load(open(runs / "no-observation-colour-s0" / "config.json"))
    assert stored["config"]["observation_colour"] is False and stored["data"]["data"] == "color-balls-random"
