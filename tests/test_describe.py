"""Models and guides as math, read off the Pyro programs."""
import dataclasses
import subprocess
import sys
import os

import torch

from inference.evaluation.describe import describe, jitter
from inference.recipes.registry import recipes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def programs(name, guide):
    recipe = recipes()[name]
    config, shape = recipe.example()
    model, q = recipe.build(tuple(shape), dataclasses.replace(config, guide=guide))
    jitter(model, q)  # the structured KVAE guide's correction starts at zero: no dependence would show
    return model, q, torch.rand((2,) + tuple(shape))


def test_vae_is_p_z_p_x_given_z_and_q_z_given_x():
    model, guide, x = programs("vae", "normal")
    assert describe(model, x).text == "p(z) p(x | z)"
    assert describe(guide, x, letter="q", given=("x",)).text == "q(z | x)"
    assert describe(model, x).latex == r"p(z) \, p(x \mid z)"


def test_dmm_is_a_markov_chain_and_its_guides_differ_as_the_paper_says():
    model, right, x = programs("dmm", "st-r")
    steps = x.shape[1]
    assert describe(model, x, steps=steps).text == "p(z_1) prod_{t=2..T} p(z_t | z_{t-1}) prod_{t=1..T} p(x_t | z_t)"
    assert describe(model, x).text == "p(z) p(x | z)"  # the chain is one site: not split without steps
    # Krishnan et al.'s table of inference networks: right context, left and right, mean field
    assert describe(right, x, letter="q", given=("x",), steps=steps).text == "q(z_1 | x_{1:T}) prod_{t=2..T} q(z_t | z_{t-1}, x_{t:T})"
    _, both, _ = programs("dmm", "st-lr")
    assert describe(both, x, letter="q", given=("x",), steps=steps).text == "q(z_1 | x_{1:T}) prod_{t=2..T} q(z_t | z_{t-1}, x_{1:T})"
    _, mean_field, _ = programs("dmm", "mf-lr")
    assert describe(mean_field, x, letter="q", given=("x",), steps=steps).text == "prod_{t=1..T} q(z_t | x_{1:T})"
    assert describe(mean_field, x, letter="q", given=("x",)).text == "q(z | x)"
    _, left, _ = programs("dmm", "st-l")
    assert describe(left, x, letter="q", given=("x",), steps=steps).text == "q(z_1 | x_1) prod_{t=2..T} q(z_t | z_{t-1}, x_{1:t})"
    latex = describe(right, x, letter="q", given=("x",), steps=steps).latex
    assert r"\prod_{t=2}^{T} q(z_t \mid z_{t-1}, x_{t:T})" in latex


def test_kvae_marginalises_z_and_its_guides_read_one_frame_or_all():
    model, factorised, x = programs("kvae", "factorised")
    steps = x.shape[1]
    assert describe(model, x, steps=steps).text == "p(a) prod_{t=1..T} p(x_t | a_t)"  # z is integrated out: no z site
    assert describe(factorised, x, letter="q", given=("x",), steps=steps).text == "prod_{t=1..T} q(a_t | x_t)"
    _, structured, _ = programs("kvae", "structured")
    assert describe(structured, x, letter="q", given=("x",), steps=steps).text == "prod_{t=1..T} q(a_t | x_{1:T})"


def test_untraceable_programs_fall_back_on_the_chain_rule():
    model, guide, x = programs("hrssm", "relaxed")
    description = describe(model, x)
    assert not description.traced and "past" in description.text and "prod_{t=1..T-1} p(m_t | past)" in description.text


def test_describe_script(tmp_path):
    (tmp_path / "dmm").mkdir()  # a run folder named like the graph's stem: never touched
    graph = tmp_path / "dmm.pdf"
    result = subprocess.run([sys.executable, "scripts/describe.py", "dmm", "--graph", str(graph)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "guide mf-lr" in result.stdout and "graph:" in result.stdout
    line = next(l for l in result.stdout.splitlines() if l.startswith("graph:"))
    assert (line == f"graph: wrote {graph}" and graph.stat().st_size > 0) or ("not written" in line and not graph.exists())
    assert os.listdir(tmp_path / "dmm") == [] and sorted(os.listdir(tmp_path)) in (["dmm"], ["dmm", "dmm.pdf"])
