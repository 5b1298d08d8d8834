"""The HRSSM (Variational Temporal Abstraction): hard constraints in prior and posterior samples, COPY
steps (z unchanged, no KL), gradients through the relaxed boundaries, shapes, the RSSM baseline, input
errors and a Trainer smoke run. Tiny sizes throughout."""
import math
from typing import NamedTuple

import pyro
import pytest
import torch
from pyro import poutine

from inference.training.elbo import make_elbo
from inference.recipes.hrssm import TemperatureAnnealing
from inference.trainer import TrainConfig, Trainer
from pyro_models.datasets import color_balls
from pyro_models.hrssm import (
    BoundarySchedule,
    HRSSMConfig,
    SegmentCounter,
    apply_constraints,
    boundaries_from_trace,
    build_hrssm,
    generate,
    impute_frames,
    jumpy_rollout,
    posterior_boundaries,
    segmentation_elbo,
    start_probabilities,
)
from pyro_models.hrssm.config import BOUNDARY_WARMUP_STEPS, COPY_STEP_EVERY

# The guide draws every boundary before the states (q(z_t | M, X) needs them all), the model draws each
# after its state, so TraceMeanField_ELBO's site-order heuristic warns; the analytic KLs are still valid
# (docs/hrssm.md).
pytestmark = pytest.mark.filterwarnings("ignore:Failed to verify mean field restriction")

# The official training settings (every KL weight 1, the UPDATE's z-KL gate detached, no warm-up, no copy steps), so
# that the training loss is the negative ELBO the tests compute by hand; tests of the defaults' levers
# set them explicitly.
TINY = dict(abstract_belief_size=6, observation_belief_size=6, abstract_state_size=3, observation_state_size=3,
            feature_size=6, conv_channels=4, mlp_hidden=(8,), boundary_layers=1,
            kl_weight_abstract=1.0, update_kl_gradient=0.0)
NO_SCHEDULE = dict(boundary_warmup_steps=0, copy_step_every=0)  # no warm-up, no copy steps: the official schedule
IMAGE, VECTOR = (3, 32, 32), (12,)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a loaded machine (another job on the other
    core) two threads spin-wait: the file took ~50 s with two threads, ~3 s with one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(**overrides):
    return HRSSMConfig(**{**TINY, **overrides})


def plan(**overrides):
    """The boundary schedule of the tests: the official one (no warm-up, no copy steps) unless overridden."""
    return BoundarySchedule(**{**NO_SCHEDULE, **overrides})


def traces(model, guide, x):
    guide_trace = poutine.trace(guide).get_trace(x)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    return guide_trace, model_trace


def segment_lengths(starts):
    """Lengths of the segments of one sequence, ``starts (T,)`` 0/1 with ``starts[0] = 1``."""
    begins = starts.nonzero().flatten().tolist() + [starts.shape[0]]
    return [b - a for a, b in zip(begins[:-1], begins[1:])]


def check_constraints(starts, config):
    """Every sequence has at most N_max segments of at most l_max frames; returns whether each bound was
    reached somewhere (so that a test can show the constraints were active, not vacuous)."""
    assert (starts[:, 0] == 1).all() and ((starts == 0) | (starts == 1)).all()
    lengths = [segment_lengths(row) for row in starts]
    assert max(len(row) for row in lengths) <= config.max_segments
    assert max(max(row) for row in lengths) <= config.max_length
    return (any(len(row) == config.max_segments for row in lengths),
            any(max(row) == config.max_length for row in lengths))


def set_boundary_bias(model, guide, value):
    with torch.no_grad():
        model.boundary_prior.linear.bias.fill_(value)
        guide.boundary_posterior.net[-1].bias.fill_(value)


# --------------------------------------------------------------------------------- constraints
@pytest.mark.parametrize("steps", [6, 9])  # 9 = N_max * l_max: the tightest case
@pytest.mark.parametrize("bias", [-6.0, 0.0, 6.0])
def test_constraints_hold_in_prior_and_posterior_samples(bias, steps):
    config = tiny(max_segments=3, max_length=3)
    batch = 300
    model, guide = build_hrssm(VECTOR, config)
    set_boundary_bias(model, guide, bias)  # many boundaries (N_max binds), few (l_max binds), or either

    prior_trace = poutine.trace(generate).get_trace(model, batch, steps)
    _, prior_starts = prior_trace.nodes["_RETURN"]["value"]
    assert torch.equal(boundaries_from_trace(prior_trace, config).starts, prior_starts)
    reached = [check_constraints(prior_starts, config)]

    x = torch.rand(batch, steps, *VECTOR)
    guide_trace = poutine.trace(guide).get_trace(x)
    posterior = boundaries_from_trace(guide_trace, config)
    assert torch.equal(posterior.starts, guide_trace.nodes["_RETURN"]["value"])
    assert torch.equal(posterior.num_segments, posterior.starts.sum(-1).long())
    reached.append(check_constraints(posterior.starts, config))
    reached.append(check_constraints(posterior_boundaries(guide, x, peaks=False, threshold=0.5).starts, config))  # noise-free argmax
    check_constraints(posterior_boundaries(guide, x).starts, config)  # the peak reading obeys the constraints too

    if bias > 0:
        assert all(n_max for n_max, _ in reached)
    if bias < 0:
        assert all(l_max for _, l_max in reached)
    # Forced steps are deterministic: the boundary site is masked exactly there, in model and guide alike,
    # and the site keeps the raw draw where the forced value overrides it.
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x)
    counter, overridden = SegmentCounter(batch, steps, config), 0
    for t in range(1, steps):
        force_copy, force_read = counter.forced(t - 1)
        free = ~(force_copy | force_read)
        for trace in (guide_trace, model_trace):
            assert torch.equal(trace.nodes[f"m_{t}"]["mask"], free)
        raw = (guide_trace.nodes[f"m_{t}"]["value"] > 0.5).float()
        assert torch.equal(raw[free], posterior.starts[free, t])
        overridden += int((raw != posterior.starts[:, t]).sum())
        counter.update(posterior.starts[:, t])
    assert overridden > 0


def test_apply_constraints_fills_forced_values():
    config = tiny(max_segments=3, max_length=2)
    # A boundary after every frame: after frame 2 one would leave 3 frames for 1 segment of <= 2 (forced
    # COPY, the look-ahead), after frame 3 l_max forces one, after frame 4 N_max forbids one.
    assert apply_constraints(torch.ones(1, 4), config)[0].tolist() == [1, 1, 0, 1, 0]
    # No boundary at all: l_max forces one every 2 frames.
    assert apply_constraints(torch.zeros(1, 4), config)[0].tolist() == [1, 0, 1, 0, 1]


class TrainedSteps(NamedTuple):
    """What :func:`train_steps` records: the loss, temperature and free-boundary switch of every step,
    and the trained parameters (all, and those of q(M | X))."""

    losses: list
    temperatures: list
    free: list
    params: torch.Tensor
    boundary_params: torch.Tensor


def train_steps(config, jit, steps, bias=None, **schedule):
    """``steps`` training steps of a tiny HRSSM on 4 colour-ball sequences (fixed seeds), the boundary
    schedule (``plan(**schedule)``) set before each, eager or compiled; ``bias``: boundary logits' bias in
    model and guide."""
    frames = torch.from_numpy(color_balls(4, num_steps=5, size=16, seed=0)[0])
    pyro.clear_param_store()
    torch.manual_seed(0)
    model, guide = build_hrssm((3, 16, 16), config)
    if bias is not None:
        set_boundary_bias(model, guide, bias)
    schedule = TemperatureAnnealing(model.temperature, plan(**schedule), config.boundaries)
    trainer = Trainer(model, guide, TrainConfig(batch_size=4, lr=1e-3, jit=jit, progress=False), callbacks=[schedule],
                      units_per_example=5)
    trainer.setup(frames)
    torch.manual_seed(1)
    losses, temperatures, free = [], [], []
    for _ in range(steps):
        schedule.on_train_batch_start(trainer, frames)
        temperatures.append(model.temperature.value)
        free.append(model.temperature.free_boundaries)
        losses.append(trainer.step(frames))
    flat = lambda params: torch.cat([p.detach().flatten() for p in params])  # noqa: E731
    return TrainedSteps(losses, temperatures, free, flat(trainer.params), flat(guide.boundary_posterior.parameters()))


def test_boundary_warmup_draws_only_the_forced_boundaries():
    """With free boundaries switched off (the warm-up), prior and posterior samples and the noise-free
    segmentation have exactly the l_max-forced boundaries and no boundary site is scored; switched back
    on, the same networks (biased towards boundaries) draw free ones again."""
    config = tiny(max_segments=3, max_length=3)
    batch, steps = 50, 8
    model, guide = build_hrssm(VECTOR, config)
    set_boundary_bias(model, guide, 5.0)  # a boundary wherever one is free
    x = torch.rand(batch, steps, *VECTOR)
    forced_only = apply_constraints(torch.zeros(batch, steps - 1), config)  # frames 1, 4, 7 start

    def segmentations():
        guide_trace, model_trace = traces(model, guide, x)
        _, prior_starts = generate(model, batch, steps)
        drawn = [guide_trace.nodes["_RETURN"]["value"], prior_starts,
                 boundaries_from_trace(guide_trace, config, model.temperature.free_tensor(x)).starts,
                 posterior_boundaries(guide, x).starts, posterior_boundaries(guide, x, sample=True).starts]
        scored = [bool(trace.nodes[f"m_{t}"]["mask"].any()) for trace in (guide_trace, model_trace) for t in range(1, steps)]
        return drawn, any(scored)

    model.temperature.free_boundaries = False
    assert guide.temperature.free_boundaries is False  # shared
    drawn, scored = segmentations()
    for starts in drawn:
        assert torch.equal(starts, forced_only)
    assert not scored
    model.temperature.free_boundaries = True
    drawn, scored = segmentations()
    for starts in drawn:
        assert not torch.equal(starts, forced_only) and check_constraints(starts, config)[0]  # N_max reached
    assert scored


def test_boundary_warmup_schedule_and_checkpoint():
    config = tiny()
    model, guide = build_hrssm(VECTOR, config)
    assert model.temperature.free_boundaries  # a built model is not in warm-up until training starts
    schedule = TemperatureAnnealing(model.temperature, plan(boundary_warmup_steps=3))
    free = []
    for _ in range(5):
        schedule.on_train_batch_start(None, None)
        free.append(model.temperature.free_boundaries)
    assert free == [False, False, False, True, True]
    model.temperature.free_boundaries = False
    restored, _ = build_hrssm(VECTOR, config)
    restored.load_state_dict(model.state_dict())
    assert restored.temperature.free_boundaries is False and restored.temperature.value == model.temperature.value


@pytest.mark.parametrize("warmup, every, expected", [
    (0, 0, "FFFFFFFF"), (3, 0, "CCCFFFFF"), (0, 2, "FCFCFCFC"), (3, 2, "CCCFCFCF"), (2, 3, "CCFFCFFC")])
def test_copy_steps_after_the_warmup(warmup, every, expected):
    """``copy_step_every`` k: after the warm-up, the last step of every k is a COPY step (no free
    boundary, as in the warm-up); after each step the switch is back on once the warm-up is over, so
    evaluation and checkpoints between steps always see free boundaries (and none inside the warm-up)."""
    steps_plan = plan(boundary_warmup_steps=warmup, copy_step_every=every)
    model, _ = build_hrssm(VECTOR, tiny())
    schedule = TemperatureAnnealing(model.temperature, steps_plan)
    during, after = "", []
    for step in range(len(expected)):
        schedule.on_train_batch_start(None, None)
        during += "F" if model.temperature.free_boundaries else "C"
        assert steps_plan.free_boundaries_at(step) == (during[-1] == "F")
        schedule.on_train_batch_end(None, 0.0)
        after.append(model.temperature.free_boundaries)
    assert during == expected
    assert after == [step >= warmup for step in range(len(expected))]


def test_compiled_training_follows_the_boundary_warmup():
    # The switch is read from a buffer like the temperature: a loss compiled during the warm-up (no free
    # boundary) draws free boundaries after it, step for step as the eager run; a warm-up of 0 steps
    # gives other losses from the first step (the warm-up did act).
    runs = {(warmup, jit): train_steps(tiny(max_segments=3, max_length=3), jit, 6, bias=2.0, boundary_warmup_steps=warmup)
            for warmup, jit in ((3, False), (3, True), (0, False))}
    eager, compiled = runs[3, False], runs[3, True]
    assert eager.free == compiled.free == [False] * 3 + [True] * 3
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
    assert torch.allclose(compiled.params, eager.params, rtol=1e-4, atol=1e-5)
    assert all(other != pytest.approx(warm, rel=1e-5) for other, warm in zip(runs[0, False].losses[:3], eager.losses[:3]))


# --------------------------------------------------------------------------------- COPY steps
def test_copy_step_keeps_z_and_adds_no_kl():
    config = tiny(max_segments=4, max_length=4)
    model, guide = build_hrssm(VECTOR, config)
    model.eval(), guide.eval()
    x = torch.rand(16, 8, *VECTOR)
    guide_trace, model_trace = traces(model, guide, x)
    states = poutine.replay(model, trace=guide_trace)(x)
    starts = guide_trace.nodes["_RETURN"]["value"]
    copy = starts == 0
    assert copy.any() and (~copy[:, 1:]).any()
    assert torch.equal(states.starts, starts)
    model_trace.compute_log_prob(), guide_trace.compute_log_prob()
    for t in range(1, 8):
        rows = copy[:, t]
        assert torch.equal(states.z[rows, t], states.z[rows, t - 1])  # identical values, not just close
        for trace in (model_trace, guide_trace):
            site = trace.nodes[f"z_{t + 1}"]
            assert torch.equal(site["mask"], ~rows)
            assert (site["log_prob"][rows] == 0).all()  # no KL term at COPY steps
        if (~rows).any():
            assert not torch.equal(states.z[~rows, t], states.z[~rows, t - 1])

    # Changing the unused z draws of COPY steps changes nothing in the ELBO.
    def elbo(g_trace):
        g_trace = poutine.trace(poutine.replay(guide, trace=g_trace)).get_trace(x)
        m_trace = poutine.trace(poutine.replay(model, trace=g_trace)).get_trace(x)
        return m_trace.log_prob_sum() - g_trace.log_prob_sum()

    before = elbo(guide_trace)
    for t in range(1, 8):
        site = guide_trace.nodes[f"z_{t + 1}"]
        site["value"] = torch.where(copy[:, t, None], site["value"] + 100.0, site["value"])
    assert torch.allclose(elbo(guide_trace), before)


def test_boundary_site_keeps_the_relaxed_sample():
    """The tensor rsample returned reaches both traces untouched, so log q - log p is that of the
    relaxed sample (finite), at the shared temperature."""
    model, guide = build_hrssm(VECTOR, tiny())
    model.temperature.value = 0.5
    x = torch.rand(4, 5, *VECTOR)
    guide_trace, model_trace = traces(model, guide, x)
    for t in range(1, 5):
        q_site, p_site = guide_trace.nodes[f"m_{t}"], model_trace.nodes[f"m_{t}"]
        assert q_site["value"] is p_site["value"] and hasattr(q_site["value"], "_relaxed_logit")
        assert torch.equal(q_site["value"], (q_site["value"]._relaxed_logit > 0).float())
        assert float(q_site["fn"].temperature) == float(p_site["fn"].temperature) == 0.5
        kl = q_site["fn"].log_prob(q_site["value"]) - p_site["fn"].log_prob(p_site["value"])
        assert torch.isfinite(kl).all()


# ----------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("elbo", ["meanfield", "trace"])
@pytest.mark.parametrize("frame_shape", [IMAGE, VECTOR])
def test_gradients_reach_every_network(elbo, frame_shape):
    model, guide = build_hrssm(frame_shape, tiny())
    loss = make_elbo(elbo).differentiable_loss(model, guide, torch.rand(3, 6, *frame_shape))
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in list(model.named_parameters()) + list(guide.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    for network in (guide.boundary_posterior, model.boundary_prior, model.observation.cell):
        assert sum(p.grad.abs().sum() for p in network.parameters()) > 0


def test_boundary_encoder_learns_through_the_gates_alone():
    """With the boundary KL weighted 0, q(M | X) still gets gradients: straight through the hard gates
    of the state recursions (model) and the GRU resets (guide)."""
    model, guide = build_hrssm(VECTOR, tiny(kl_weight_boundary=0.0))
    loss = make_elbo("meanfield").differentiable_loss(model, guide, torch.rand(3, 6, *VECTOR))
    loss.backward()
    assert sum(p.grad.abs().sum() for p in guide.boundary_posterior.parameters()) > 0
    assert all(p.grad is None or (p.grad == 0).all() for p in model.boundary_prior.parameters())


@pytest.mark.parametrize("weight", [0.4, 1.0])
def test_update_kl_gradient_changes_gradients_only(weight):
    """With ``update_kl_gradient`` w the loss is the same number, and the boundary logits' gradient gains
    exactly w times that of sum_t KL_z,t * gate_t over UPDATE steps (KL held fixed; the gate is the
    straight-through boundary), computed here by hand from the traces."""
    x = torch.rand(5, 6, *VECTOR)

    def loss_and_grad(gradient_weight):
        pyro.clear_param_store()
        torch.manual_seed(0)
        model, guide = build_hrssm(VECTOR, tiny(update_kl_gradient=gradient_weight))
        pyro.set_rng_seed(1)
        loss = make_elbo("meanfield").differentiable_loss(model, guide, x)
        bias = guide.boundary_posterior.net[-1].bias
        return loss, torch.autograd.grad(loss, bias)[0], (model, guide, bias)

    loss_off, grad_off, _ = loss_and_grad(0.0)
    loss_on, grad_on, (model, guide, bias) = loss_and_grad(weight)
    assert torch.allclose(loss_on, loss_off)
    assert not torch.allclose(grad_on, grad_off)

    pyro.set_rng_seed(1)
    guide_trace, model_trace = traces(model, guide, x)
    starts = guide_trace.nodes["_RETURN"]["value"]
    surrogate = 0.0
    for t in range(1, x.shape[1]):
        q, p = guide_trace.nodes[f"z_{t + 1}"]["fn"], model_trace.nodes[f"z_{t + 1}"]["fn"]
        kl = torch.distributions.kl_divergence(q, p).detach()
        surrogate = surrogate + (kl * starts[:, t] * (starts[:, t] > 0.5)).sum()
    expected = weight * torch.autograd.grad(surrogate, bias)[0]
    assert torch.allclose(grad_on - grad_off, expected, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------- segmentation ELBO
@pytest.mark.parametrize("bias", [-30.0, 30.0])
def test_segmentation_elbo_matches_pyro_elbo_of_a_deterministic_posterior(bias):
    """Reference: when q(M | X) and p(M | S) both put all their mass on the same segmentation (every
    logit ``bias``: all COPY or all UPDATE, constraints applied), Pyro's TraceMeanField ELBO has no
    boundary term (log q - log p of identical relaxed densities is 0) and must agree, within Monte
    Carlo error, with segmentation_elbo of that segmentation."""
    model, guide = build_hrssm(VECTOR, tiny(max_segments=4, max_length=3))
    with torch.no_grad():
        model.boundary_prior.linear.weight.zero_()
        guide.boundary_posterior.net[-1].weight.zero_()
    set_boundary_bias(model, guide, bias)
    model.eval(), guide.eval()
    x = torch.rand(4, 8, *VECTOR)
    starts = posterior_boundaries(guide, x, peaks=False, threshold=0.5).starts  # the argmax: q's point mass
    assert (starts[:, 1:] == (1.0 if bias > 0 else 0.0)).any()  # free steps follow the bias
    draws = 150
    elbo = make_elbo("meanfield")
    pyro.set_rng_seed(0)
    reference = torch.tensor([-float(elbo.loss(model, guide, x)) for _ in range(draws)]) / x.shape[0]
    pyro.set_rng_seed(1)
    ours = segmentation_elbo(model, guide, x, starts, num_samples=draws)
    assert ours.elbo.shape == (4,)
    assert torch.allclose(ours.elbo, ours.log_likelihood + ours.log_prior_boundaries - ours.kl_abstract - ours.kl_observation)
    assert ours.log_prior_boundaries.abs().max() < 1e-6  # logits +-30 on the values they favour
    tolerance = 5 * reference.std() * (2 / draws) ** 0.5  # two independent means of `draws` draws
    assert abs(float(ours.elbo.mean()) - float(reference.mean())) < tolerance


def test_segmentation_elbo_depends_on_the_segmentation_and_checks_input():
    model, guide = build_hrssm(VECTOR, tiny())
    x = torch.rand(3, 6, *VECTOR)
    none, every = torch.zeros(3, 6), torch.ones(3, 6)
    a, b = segmentation_elbo(model, guide, x, none), segmentation_elbo(model, guide, x, every)
    assert (a.kl_abstract < b.kl_abstract).all()  # one z-KL against six
    assert not torch.allclose(a.elbo, b.elbo)
    with pytest.raises(ValueError, match=r"starts: expected shape \(3, 6\) \(batch, T\), got \(3, 5\)"):
        segmentation_elbo(model, guide, x, none[:, :5])


# ------------------------------------------------------------------------------- missing frames
@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("frame_shape", [IMAGE, VECTOR])
def test_missing_frames_are_never_read(frame_shape, training):
    """The ELBO of a draw does not depend on the content of missing frames (neither the likelihood nor
    any posterior factor reads them), and does on that of observed ones; in training mode too, where
    batch norm mixes the frames of a batch through its statistics."""
    model, guide = build_hrssm(frame_shape, tiny())
    model.train(training), guide.train(training)
    x = torch.rand(3, 5, *frame_shape)
    mask = torch.tensor([[True, False, True, True, False], [True] * 5, [False, True, True, False, True]])

    def loss(frames):
        pyro.set_rng_seed(0)
        return make_elbo("meanfield").differentiable_loss(model, guide, frames, mask)

    changed = x.clone()
    changed[~mask] = torch.rand_like(changed[~mask])
    assert torch.equal(loss(changed), loss(x))  # the same computation exactly, not just close
    changed[mask] = torch.rand_like(changed[mask])
    assert not torch.allclose(loss(changed), loss(x))


def test_impute_frames_keeps_observed_and_fills_missing():
    model, guide = build_hrssm(IMAGE, tiny())
    x = torch.from_numpy(color_balls(3, 6, seed=0)[0])
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[:, 3:5] = False
    result = impute_frames(model, guide, x, mask, num_samples=4)
    assert result.samples.shape == (4, *x.shape) and result.imputed.shape == x.shape
    assert torch.equal(result.imputed[mask], x[mask])
    assert torch.allclose(result.imputed, result.samples.mean(0))
    missing = result.imputed[~mask]
    assert missing.min() > 0 and missing.max() < 1  # decoder means, not copies of the data
    assert torch.equal(result.mask, mask) and torch.equal(result.estimates["posterior_mean"], result.imputed)
    assert model.training and guide.training  # mode restored
    with pytest.raises(ValueError, match="num_samples: expected >= 1, got 0"):
        impute_frames(model, guide, x, mask, num_samples=0)


def _replayed_model(model, guide, x, mask, replay, seed):
    """The model's trace on one guide draw under ``replay(model, guide_trace)``, the guide and the model
    drawing from one seeded stream."""
    pyro.set_rng_seed(seed)
    guide_trace = poutine.trace(guide).get_trace(x, mask)
    return guide_trace, poutine.trace(replay(model, guide_trace)).get_trace(x, mask)


def test_past_the_last_observed_frame_the_states_come_from_the_model():
    from pyro_models.hrssm.evaluation import observed_sites
    from pyro_models.imputation import last_observed, replay_rows
    model, guide = build_hrssm(VECTOR, tiny(max_segments=3, max_length=3))
    model.eval(), guide.eval()
    x, steps = torch.rand(4, 7, *VECTOR), 7
    # every sequence observed to frame 3: the partial replay is Pyro's replay of the guide's sites up to it
    mask = torch.zeros(4, steps, dtype=torch.bool)
    mask[:, :4] = True
    rows = observed_sites(last_observed(mask))

    def truncated(model, trace):
        kept = trace.copy()
        for name in list(kept.nodes):
            if name.partition("_")[2].isdigit() and not bool(rows(name).all()):
                kept.remove_node(name)
        return poutine.replay(model, trace=kept)

    _, ours = _replayed_model(model, guide, x, mask, lambda m, t: replay_rows(m, t, rows), seed=3)
    _, reference = _replayed_model(model, guide, x, mask, truncated, seed=3)
    names = [n for n in ours.nodes if n.partition("_")[2].isdigit()]
    assert names and all(torch.equal(ours.nodes[n]["value"], reference.nodes[n]["value"]) for n in names)
    guide_trace, _ = _replayed_model(model, guide, x, mask, truncated, seed=3)
    assert not torch.equal(ours.nodes["s_7"]["value"], guide_trace.nodes["s_7"]["value"])  # not the guide's
    assert torch.equal(ours.nodes["s_4"]["value"], guide_trace.nodes["s_4"]["value"])  # frame 3: the guide's
    # sequences with their own last observed frames (-1: none): the guide's draw exactly where observed
    mask = torch.arange(steps) <= torch.tensor([[6], [2], [-1], [4]])  # (4, 7)
    last = last_observed(mask)
    guide_trace, ours = _replayed_model(model, guide, x, mask, lambda m, t: replay_rows(m, t, observed_sites(last)), seed=5)
    for k in range(1, steps + 1):
        for name, replayed in ((f"z_{k}", k - 1 <= last), (f"s_{k}", k - 1 <= last), (f"m_{k}", k <= last)):
            if name not in ours.nodes:
                continue
            same = (ours.nodes[name]["value"] == guide_trace.nodes[name]["value"]).reshape(4, -1).all(-1)
            assert torch.equal(same[replayed], torch.ones_like(same[replayed])), name
            if name.startswith("s"):  # continuous draws of the model's own differ from the guide's
                assert not same[~replayed].any(), name


# --------------------------------------------------------------------------------------- shapes
@pytest.mark.parametrize("boundaries", [True, False])
@pytest.mark.parametrize("steps", [2, 5])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("frame_shape", [IMAGE, VECTOR])
def test_shapes(frame_shape, batch, steps, boundaries):
    config = tiny(boundaries=boundaries)
    model, guide = build_hrssm(frame_shape, config)
    x = torch.rand(batch, steps, *frame_shape)
    guide_trace, model_trace = traces(model, guide, x)
    assert guide_trace.nodes["_RETURN"]["value"].shape == (batch, steps)
    states = model_trace.nodes["_RETURN"]["value"]
    assert states.starts.shape == (batch, steps) and states.z.shape == (batch, steps, 3)
    assert states.c.shape == states.h.shape == (batch, steps, 6) and states.s.shape == (batch, steps, 3)
    assert model_trace.nodes["x"]["fn"].event_shape == (steps, *frame_shape)
    assert model_trace.nodes["x"]["fn"].batch_shape == (batch,)
    expected = {f"{v}_{t}" for v in "zs" for t in range(1, steps + 1)}
    expected |= {f"m_{t}" for t in range(1, steps)} if boundaries else set()
    latent = {n for n, s in guide_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]} - {"sequences"}
    assert latent == expected
    assert math.isfinite(make_elbo("meanfield").differentiable_loss(model, guide, x).item())
    assert posterior_boundaries(guide, x).starts.shape == (batch, steps)


@pytest.mark.parametrize("frame_shape", [IMAGE, VECTOR])
def test_one_frame_generation_and_rollout(frame_shape):
    model, guide = build_hrssm(frame_shape, tiny())
    x = torch.rand(2, 1, *frame_shape)
    assert torch.isfinite(make_elbo("trace").differentiable_loss(model, guide, x))
    means, starts = generate(model, 2, 4)
    assert means.shape == (2, 4, *frame_shape) and starts.shape == (2, 4)
    assert ((means > 0) & (means < 1)).all()
    model.train(), guide.train()
    rollout = jumpy_rollout(model, guide, torch.rand(2, 3, *frame_shape), num_segments=3)
    assert rollout.shape == (2, 3, *frame_shape) and model.training and guide.training  # mode restored
    prefix = torch.rand(2, 3, *frame_shape)
    pyro.set_rng_seed(1)
    mean_rollout = jumpy_rollout(model, guide, prefix, num_segments=2, sample=False)
    # By hand: the prefix's posterior draw (same seed), then one UPDATE per segment at the prior means.
    pyro.set_rng_seed(1)
    model.eval(), guide.eval()
    with torch.no_grad():
        states = poutine.replay(model, trace=poutine.trace(guide).get_trace(prefix))(prefix)
        c, z, expected = states.c[:, -1], states.z[:, -1], []
        for _ in range(2):
            c = model.abstract.belief(z, c)
            z = model.abstract(c)[0]
            h = model.observation.init(c, z)
            expected.append(model.frame_mean(model.state_feature(h, model.observation(h)[0]).unsqueeze(1))[:, 0])
    model.train(), guide.train()
    assert torch.allclose(mean_rollout, torch.stack(expected, dim=1), atol=1e-6)
    pyro.set_rng_seed(1)
    assert not torch.allclose(jumpy_rollout(model, guide, prefix, 2, sample=True), mean_rollout)  # draws differ from means


def test_without_boundaries_every_step_updates():
    config = tiny(boundaries=False, max_segments=1, max_length=1)  # constraints are ignored
    model, guide = build_hrssm(VECTOR, config)
    assert model.boundary_prior is None and guide.boundary_posterior is None and model.observation.cell is None
    x = torch.rand(3, 7, *VECTOR)
    guide_trace, model_trace = traces(model, guide, x)
    assert not any(name.startswith("m_") for name in list(guide_trace.nodes) + list(model_trace.nodes))
    assert (guide_trace.nodes["_RETURN"]["value"] == 1).all()
    assert (model_trace.nodes["_RETURN"]["value"].starts == 1).all()
    for t in range(1, 8):
        assert model_trace.nodes[f"z_{t}"]["mask"].all() and guide_trace.nodes[f"z_{t}"]["mask"].all()
    assert (boundaries_from_trace(guide_trace, config).num_segments == 7).all()
    assert (posterior_boundaries(guide, x).starts == 1).all()
    assert (generate(model, 2, 7)[1] == 1).all()


@pytest.mark.parametrize("reset", [True, False])
def test_observation_reset_decides_what_a_segment_start_forgets(reset):
    # Every step an UPDATE (boundary logits +30, l_max 1 at the end): with the paper's reset, h_t is the
    # abstract feature a_t and the guide's phi_t sees frame t alone; with observation_reset=False, h_t is
    # the GRU step from (s_{t-1}, a_t, h_{t-1}) and phi_t reads every earlier frame.
    steps = 4
    config = tiny(max_segments=steps, max_length=2, observation_reset=reset)
    model, guide = build_hrssm(VECTOR, config)
    set_boundary_bias(model, guide, 30.0)
    x = torch.rand(2, steps, *VECTOR)
    guide_trace, model_trace = traces(model, guide, x)
    states = model_trace.nodes["_RETURN"]["value"]
    assert (states.starts == 1).all()
    for t in range(1, steps):
        a = model.observation.init(states.c[:, t], states.z[:, t])
        carried = model.observation.update(states.s[:, t - 1], a, states.h[:, t - 1])
        assert torch.allclose(states.h[:, t], a if reset else carried, atol=1e-6)
        assert not torch.allclose(states.h[:, t], carried if reset else a, atol=1e-3)
    # The guide: q(s_t | z_t, M, X) reads phi reset at every start (the paper) or never reset.
    posterior = guide.observation_posterior
    with torch.no_grad():
        e = guide.features(x)
        phi = {True: posterior.features(e, states.starts), False: posterior.features(e, torch.zeros_like(states.starts))}
        for t in range(1, steps):
            loc = guide_trace.nodes[f"s_{t + 1}"]["fn"].base_dist.loc
            z = guide_trace.nodes[f"z_{t + 1}"]["value"]
            assert torch.allclose(loc, posterior(phi[reset][:, t], z)[0], atol=1e-6)
            assert not torch.allclose(loc, posterior(phi[not reset][:, t], z)[0], atol=1e-3)
    assert math.isfinite(make_elbo("meanfield").differentiable_loss(model, guide, x).item())
    assert jumpy_rollout(model, guide, x, num_segments=2).shape == (2, 2, *VECTOR)


def test_without_observation_colour_the_observation_posterior_cannot_see_colours():
    # observation_colour=False: q(s_t | z_t, M, X) reads each frame's channel maximum, so the same shapes in
    # other colours (channels permuted) give the same s-posterior for the same z and boundaries, while the
    # boundary and abstract posteriors, which read the colours, change.
    torch.manual_seed(0)
    config = tiny(max_segments=3, max_length=4, observation_colour=False)
    model, guide = build_hrssm(IMAGE, config)
    model.eval(), guide.eval()
    shapes = (torch.rand(2, 6, 1, *IMAGE[1:]) > 0.8).float()
    red, blue = shapes * torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1), shapes * torch.tensor([0.0, 0.0, 1.0]).view(3, 1, 1)
    seen = {}
    for name, x in (("red", red), ("blue", blue)):
        e = guide.features(x)
        seen[name] = (guide.observation_features(x, e), guide.boundary_logits(x), guide.abstract_posterior.features(e, torch.ones(2, 6)))
    assert torch.equal(seen["red"][0], seen["blue"][0])
    assert not torch.allclose(seen["red"][1], seen["blue"][1]) and not torch.allclose(seen["red"][2], seen["blue"][2])
    with_colour = build_hrssm(IMAGE, tiny(max_segments=3, max_length=4))[1].eval()
    e_red, e_blue = with_colour.features(red), with_colour.features(blue)
    assert not torch.allclose(with_colour.observation_features(red, e_red), with_colour.observation_features(blue, e_blue))
    assert math.isfinite(make_elbo("meanfield").differentiable_loss(model, guide, red).item())
    with pytest.raises(ValueError, match=r"observation_colour: False needs image frames with colour channels .* got frame_shape \(12,\)"):
        build_hrssm(VECTOR, config)
    with pytest.raises(ValueError, match=r"observation_colour: .* got frame_shape \(1, 32, 32\)"):
        build_hrssm((1, 32, 32), config)


# ------------------------------------------------------------------------------------ bad input
def test_bad_input_is_named():
    model, guide = build_hrssm(VECTOR, tiny(max_segments=2, max_length=3))
    x = torch.rand(2, 4, 12)
    for program in (model, guide):
        with pytest.raises(ValueError, match=r"x: expected shape \(batch, T, 12\) with batch, T >= 1, got \(2, 4, 11\)"):
            program(torch.rand(2, 4, 11))
        with pytest.raises(ValueError, match=r"x: expected shape .* got \(4, 12\)"):
            program(torch.rand(4, 12))
        with pytest.raises(ValueError, match=r"got \(2, 0, 12\)"):
            program(torch.rand(2, 0, 12))
        with pytest.raises(ValueError, match="x: expected a floating-point tensor"):
            program(torch.ones(2, 4, 12, dtype=torch.long))
        with pytest.raises(ValueError, match=r"x: T = 7 frames .* max_segments = 2 .* max_length = 3"):
            program(torch.rand(2, 7, 12))
        with pytest.raises(ValueError, match=r"mask: expected shape \(2, 4\) \(batch, T\), got \(2, 3\)"):
            program(x, torch.ones(2, 3, dtype=torch.bool))
        with pytest.raises(ValueError, match="mask: expected a bool tensor .* got torch.float32"):
            program(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"frame_shape: .* got \(4, 4\)"):
        build_hrssm((4, 4), tiny())
    with pytest.raises(ValueError, match=r"multiples of 2\^conv_layers = 8, got 30x30"):
        build_hrssm((3, 30, 30), tiny())
    for bad, match in [(dict(max_segments=0), "max_segments"),
                       (dict(boundary_kernel=2), "boundary_kernel"), (dict(obs_scale=0.0), "obs_scale"),
                       (dict(kl_weight_boundary=-1.0), "kl_weight_boundary"),
                       (dict(observation_reset=False, boundaries=False), "observation_reset: False applies to boundaries only")]:
        with pytest.raises(ValueError, match=match):
            tiny(**bad)
    for bad, match in [(dict(temperature_min=2.0), "temperature_min"),
                       (dict(boundary_warmup_steps=-1), "boundary_warmup_steps: expected >= 0, got -1"),
                       (dict(copy_step_every=-1), r"copy_step_every: expected 0 \(off\) or >= 2 .* got -1"),
                       (dict(copy_step_every=1), r"copy_step_every: expected 0 \(off\) or >= 2 .* got 1")]:
        with pytest.raises(ValueError, match=match):
            plan(**bad)
    for bad in (dict(boundary_warmup_steps=5), dict(copy_step_every=3)):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}: applies to boundaries only"):
            plan(**bad).check(tiny(boundaries=False))
    with pytest.raises(ValueError, match="num_segments"):
        jumpy_rollout(model, guide, x, 0)
    with pytest.raises(ValueError, match="num_steps"):
        generate(model, 2, 7)


@pytest.mark.parametrize("field, resolved, default", [("boundary_warmup_steps", "warmup_steps", BOUNDARY_WARMUP_STEPS),
                                                      ("copy_step_every", "copy_period", COPY_STEP_EVERY)])
def test_default_boundary_schedules_are_off_for_the_rssm_baseline(field, resolved, default):
    """The default boundary warm-up and copy steps hold back boundaries; the RSSM baseline has none, so
    its defaults are 0. An explicit value there is refused, even one equal to the default with boundaries."""
    assert getattr(BoundarySchedule(), resolved)(True) == default > 0
    assert getattr(BoundarySchedule(), resolved)(False) == 0
    assert getattr(BoundarySchedule(**{field: 0}), resolved)(False) == 0
    assert getattr(BoundarySchedule(**{field: 7}), resolved)(True) == 7
    BoundarySchedule().check(HRSSMConfig(boundaries=False))  # the defaults suit the baseline
    with pytest.raises(ValueError, match=f"{field}: applies to boundaries only"):
        BoundarySchedule(**{field: default}).check(HRSSMConfig(boundaries=False))


# ------------------------------------------------------------------------------------- training
def test_temperature_schedule():
    schedule = BoundarySchedule()
    assert schedule.temperature_at(0) == schedule.temperature_max
    values = [schedule.temperature_at(step) for step in (0, 100, 10_000, 10_000_000)]
    assert values == sorted(values, reverse=True) and values[-1] == pytest.approx(schedule.temperature_min)
    assert schedule.temperature_at(100) == pytest.approx(0.9 * 0.999 + 0.1)  # the official formula


def test_trainer_smoke_run_on_color_balls():
    steps = 6
    frames, _ = color_balls(12, num_steps=steps, size=16, seed=0)
    data = torch.from_numpy(frames)
    train, test = data[:8], data[8:]
    config = tiny(max_segments=3, max_length=4)
    model, guide = build_hrssm((3, 16, 16), config)
    annealing = TemperatureAnnealing(model.temperature, plan(temperature_decay_steps=1.0))
    train_config = TrainConfig(epochs=2, batch_size=4, lr=5e-4, clip_norm=10.0, mean_loss=True, progress=False,
                               train_eval_size=8, eval_batch_size=4)
    history = Trainer(model, guide, train_config, callbacks=[annealing], units_per_example=steps).fit(train, test)
    assert [m["epoch"] for m in history] == [1, 2]
    for metrics in history:
        for key in ("train_objective", "train_elbo", "test_elbo", "test_log_lik", "kl", "temperature"):
            assert math.isfinite(metrics[key]), key
    assert annealing.step == 4 and history[-1]["temperature"] < annealing.schedule.temperature_max
    assert guide.temperature is model.temperature


def test_compiled_training_follows_the_annealed_temperature():
    # The temperature is read from a buffer, so a compiled loss (traced at the first temperature) sees
    # every annealed value: with the schedule moving it at each step, the compiled run's losses and
    # parameters equal the eager run's step for step. (A trace reading a Python float would freeze the
    # first temperature; the boundary KL then differs from the eager one from step 1 on.)
    config = tiny(max_segments=3, max_length=3)
    eager, compiled = (train_steps(config, jit, 8, temperature_decay=0.5, temperature_decay_steps=1.0) for jit in (False, True))
    assert compiled.temperatures == eager.temperatures and eager.temperatures[-1] < 0.2  # it did move
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
    assert torch.allclose(compiled.params, eager.params, rtol=1e-4, atol=1e-5)


def peaks_above(probs, threshold):
    """Reference for the peak reading, frame by frame: above ``threshold``, above the frame before and
    not below the frame after."""
    return torch.tensor([[row[t] > threshold and (t == 0 or row[t] > row[t - 1]) and (t == len(row) - 1 or row[t] >= row[t + 1])
                          for t in range(len(row))] for row in probs.tolist()])


@pytest.mark.parametrize("peaks, threshold", [(False, 0.5), (True, 0.5)])  # an untrained guide is near 1/2
def test_start_probabilities_match_the_noise_free_boundaries(peaks, threshold):
    """With constraints that never bind (N_max = l_max = T), a frame starts a segment in the noise-free
    segmentation exactly when its start probability is above the threshold (1/2: the per-frame argmax)
    and, with ``peaks``, a local maximum over time."""
    steps = 9
    model, guide = build_hrssm(VECTOR, tiny(max_segments=steps, max_length=steps))
    x = torch.randn(6, steps, *VECTOR) * 3
    probs = start_probabilities(guide, x)
    assert probs.shape == (6, steps - 1) and ((probs > 0) & (probs < 1)).all()
    assert 0 < (probs > threshold).float().mean() < 1  # both sides of the threshold occur, so the comparison can fail
    expected = peaks_above(probs, threshold) if peaks else probs > threshold
    if peaks:
        assert (expected != (probs > threshold)).any()  # the peak reading drops some frames above the threshold
    starts = posterior_boundaries(guide, x, peaks=peaks, threshold=threshold).starts
    assert torch.equal(starts[:, 1:].bool(), expected) and (starts[:, 0] == 1).all()
    _, rssm_guide = build_hrssm(VECTOR, tiny(boundaries=False))
    with pytest.raises(ValueError, match="start_probabilities"):
        start_probabilities(rssm_guide, x)


@pytest.mark.parametrize("guide_name", ["relaxed", "causal"])
def test_causal_guide_segments_online(guide_name):
    model, guide = build_hrssm(VECTOR, tiny(guide=guide_name))
    guide.eval()
    x = torch.rand(2, 6, *VECTOR)
    later = x.clone()
    later[:, 4:] = torch.rand_like(later[:, 4:])
    with torch.no_grad():
        changed = (guide.boundary_logits(later) - guide.boundary_logits(x)).abs()
    assert changed[:, 4:].max() > 0  # frames 5, 6 change their own logits in both guides
    if guide_name == "causal":
        assert changed[:, :4].max() == 0  # q(frame t starts a segment) reads frames 1..t only
    else:
        assert changed[:, 3].max() > 0  # the centred convolutions read ahead
    assert torch.isfinite(make_elbo("meanfield").differentiable_loss(model, guide, x))


def test_epoch_report_has_the_segmentation_gap_and_leaves_training_draws_alone():
    from inference.recipes.hrssm import HRSSMReport, epoch_segmentation_gap

    frames, events = color_balls(6, num_steps=5, size=16, seed=0)
    x = torch.from_numpy(frames)
    model, guide = build_hrssm((3, 16, 16), tiny(max_segments=3, max_length=3))
    set_boundary_bias(model, guide, 1.0)

    class FakeTrainer:  # what the report reads of a Trainer
        test_data, test_mask, device, run = x, None, torch.device("cpu"), None

    FakeTrainer.model, FakeTrainer.guide = model, guide
    torch.manual_seed(3)
    before = torch.get_rng_state()
    metrics = HRSSMReport(torch.from_numpy(events), gap_sequences=4).on_validation_epoch_end(FakeTrainer, 1)
    assert torch.equal(torch.get_rng_state(), before)  # training's random stream is untouched
    starts = posterior_boundaries(guide, x[:4]).starts
    assert metrics["segmentation_gap"] == epoch_segmentation_gap(model, guide, x[:4], starts)  # common random numbers
    torch.manual_seed(0)
    own = segmentation_elbo(model, guide, x[:4], starts, 2).elbo.mean()
    torch.manual_seed(0)
    none = segmentation_elbo(model, guide, x[:4], torch.zeros_like(starts), 2).elbo.mean()
    assert metrics["segmentation_gap"] == pytest.approx(float(own - none), rel=1e-6)
    assert metrics["segmentation_gap"] != 0.0 and "boundary_f1" in metrics


@pytest.mark.parametrize("option", [dict(update_kl_gradient=0.5), dict(kl_weight_observation=1.5),
                                    dict(boundary_warmup_steps=2), dict(copy_step_every=2)])
def test_compiled_training_keeps_every_training_option(option):
    # Each option changes what q(M | X) learns in the eager run, and the compiled run learns the same.
    # (A compiled loss is traced on inputs that need no gradient: a branch on ``requires_grad`` in the
    # model took the wrong way there, and update_kl_gradient did nothing when compiled.)
    scheduled = {k: v for k, v in option.items() if k in NO_SCHEDULE}
    base = tiny(max_segments=3, max_length=3)
    changed = tiny(max_segments=3, max_length=3, **{k: v for k, v in option.items() if k not in scheduled})
    eager, compiled, unchanged = (train_steps(c, jit, 4, **s).boundary_params
                                  for c, jit, s in ((changed, False, scheduled), (changed, True, scheduled), (base, True, {})))
    assert torch.allclose(compiled, eager, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(compiled, unchanged, rtol=1e-4, atol=1e-6)


def test_a_run_stored_with_the_schedule_in_its_config_is_read_with_it_as_options():
    """The boundary schedule moved from HRSSMConfig to the recipe's options: an older config.json is read
    with the moved fields as options (and the same run compares equal)."""
    from inference.runs.experiment import RunSpec, normalised_config

    spec = RunSpec("hrssm", tiny(), TrainConfig(), options=plan(copy_step_every=4, temperature_decay_steps=2.0))
    stored = spec.to_json()
    old = {**stored, "config": {**stored["config"], **stored["options"]}, "options": {}}  # as written before the move
    read = RunSpec.from_json(old)
    assert read.options == spec.options and read.config == spec.config
    assert normalised_config(old)["options"] == stored["options"]


@pytest.mark.parametrize("likelihood", ["gaussian", "bernoulli"])
def test_the_frame_likelihood_is_the_one_configured(likelihood):
    """The x site's log density against one written out from the decoder's means: Normal(mean, obs_scale)
    or Bernoulli(mean), summed over each sequence's frames; a missing frame adds nothing."""
    model, guide = build_hrssm(VECTOR, tiny(likelihood=likelihood))
    x = (torch.rand(3, 6, *VECTOR) > 0.5).float()
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 2] = False
    guide_trace = poutine.trace(guide).get_trace(x, mask)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, mask)
    site = model_trace.nodes["x"]
    mean = model.frame_mean(model_trace.nodes["_RETURN"]["value"].f)  # (batch, T, D)
    if likelihood == "bernoulli":
        per_frame = (x * mean.log() + (1 - x) * (1 - mean).log()).sum(-1)
    else:
        per_frame = torch.distributions.Normal(mean, model.config.obs_scale).log_prob(x).sum(-1)
    expected = (per_frame * mask).sum(-1)  # (batch,)
    assert torch.allclose(site["fn"].log_prob(site["value"]), expected, atol=1e-4)
