"""The KVAE warm start: each stage does what it claims, measured against the state before it."""
import pytest
import torch

from inference.recipes.kvae.warmstart import (
    WarmStartConfig,
    best_warm_start,
    fit_dynamics,
    pretrain_autoencoder,
    standardise_codes,
    warm_start,
    warm_start_for,
    warm_start_score,
)
from inference.trainer import TrainConfig
from pyro_models.kvae import KalmanPrior, KVAEConfig, build_kvae

SMALL = dict(lstm_hidden=8, decoder_channels=8, decoder_start_channels=4, encoder_filters=4, mlp_hidden=(16,))
FRAME_SHAPES = [(1, 8, 8), (6,)]


def frames(shape, n=12, steps=5):
    """Binary sequences ``(n, steps, *shape)`` with structure: a bright unit moving one step per frame."""
    size = int(torch.Size(shape).numel())
    start = torch.randint(size, (n, 1))
    position = (start + torch.arange(steps)) % size  # (n, steps)
    x = torch.nn.functional.one_hot(position, size).float()  # (n, steps, size)
    return x.reshape(n, steps, *shape)


def build(shape):
    blocks = dict(decoder_blocks=2) if len(shape) == 3 else {}
    return build_kvae(shape, KVAEConfig(**SMALL, **blocks))


@pytest.mark.parametrize("shape", FRAME_SHAPES)
def test_standardise_codes_keeps_the_decoded_frames(shape):
    model, guide = build(shape)
    x = frames(shape)
    with torch.no_grad():
        guide.encoder.head.loc.bias.add_(3.0)  # codes off-centre, so the test can fail
        before = model.frame_logits(guide.posterior(x).mean)
    mean, std = standardise_codes(model, guide, x, chunk=5)
    assert mean.shape == std.shape == (2,) and (mean.abs() > 1).all()
    with torch.no_grad():
        codes = guide.posterior(x).mean.reshape(-1, 2)
        after = model.frame_logits(guide.posterior(x).mean)
    # float32: the codes' spread at initialisation is ~1e-3, so rescaling amplifies rounding ~1000x
    assert torch.allclose(codes.mean(0), torch.zeros(2), atol=1e-3)
    assert torch.allclose(codes.std(0), torch.ones(2), atol=1e-3)
    assert torch.allclose(before, after, atol=1e-3)


@pytest.mark.parametrize("shape", FRAME_SHAPES)
def test_autoencoder_stage_lowers_the_loss_and_touches_only_encoder_mean_and_decoder(shape):
    model, guide = build(shape)
    x = frames(shape, n=16)
    untouched = [p.detach().clone() for p in (*guide.encoder.head.var.parameters(), *model.dynamics.parameters())]
    config = WarmStartConfig(autoencoder_steps=1, frames_per_step=80, lr=0.01)
    first = pretrain_autoencoder(model, guide, x, config)
    last = pretrain_autoencoder(model, guide, x, WarmStartConfig(autoencoder_steps=60, frames_per_step=80, lr=0.01))
    assert last < 0.8 * first
    after = [*guide.encoder.head.var.parameters(), *model.dynamics.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(untouched, after))


def test_dynamics_stage_raises_log_p_of_the_codes():
    model, guide = build((6,))
    x = frames((6,), n=16)
    standardise_codes(model, guide, x)
    lstm = [p.detach().clone() for p in model.dynamics.lstm.parameters()]

    def log_p():
        with torch.no_grad():
            a = guide.posterior(x).mean
            return float(KalmanPrior(model.dynamics, (16,), 5, 2).log_prob(a).mean())

    before = log_p()
    fit_dynamics(model, guide, x, WarmStartConfig(dynamics_steps=40, batch_size=16, lr=0.02))
    assert log_p() > before + 1.0
    assert all(torch.equal(a, b) for a, b in zip(lstm, model.dynamics.lstm.parameters()))


def test_warm_start_result_and_bad_input():
    model, guide = build((6,))
    result = warm_start(model, guide, frames((6,)), WarmStartConfig(autoencoder_steps=3, dynamics_steps=3, batch_size=4))
    assert result.code_mean.shape == result.code_std.shape == (2,)
    assert torch.isfinite(torch.tensor([result.autoencoder_loss, result.dynamics_loss])).all()
    with pytest.raises(ValueError, match="train: expected shape"):
        warm_start(model, guide, torch.rand(4, 5, 7), WarmStartConfig())
    for bad, match in [(dict(autoencoder_steps=-1), "autoencoder_steps"), (dict(batch_size=0), "batch_size"), (dict(frames_per_step=0), "frames_per_step")]:
        with pytest.raises(ValueError, match=match):
            WarmStartConfig(**bad)


def test_warm_start_for_takes_the_runs_batch_lr_and_seed():
    run = TrainConfig(batch_size=7, lr=0.003, seed=5)
    assert warm_start_for(run, 0, 300) is None  # 0 autoencoder steps: the original recipe
    assert warm_start_for(run, 40, 20) == WarmStartConfig(autoencoder_steps=40, dynamics_steps=20, batch_size=7, lr=0.003, seed=5)


def test_trajectory_kinks_against_a_hand_computation_and_its_mask():
    from inference.recipes.kvae.warmstart import trajectory_kinks
    line = torch.arange(6.0).reshape(1, 6, 1) * torch.tensor([2.0, -1.0])  # straight: no kink
    assert trajectory_kinks(line).item() == 0.0
    bounce = torch.tensor([0.0, 1.0, 2.0, 1.0, 0.0]).reshape(1, 5, 1)  # one kink of |1 - 4 + 1| = 2 at t = 2
    expected = 2.0 / bounce.reshape(-1).std() / 3  # three triples, divided by the codes' spread
    assert torch.isclose(trajectory_kinks(bounce), expected)
    mask = torch.tensor([[True, True, True, True, False]])  # the last triple is not fully observed
    spread = bounce[0, :4, 0].std()
    assert torch.isclose(trajectory_kinks(bounce, mask), 2.0 / spread / 2)
    # scale-free: shrinking the codes cannot dodge the penalty
    assert torch.isclose(trajectory_kinks(0.01 * bounce), trajectory_kinks(bounce))


def test_warm_start_with_the_penalty_and_the_lstm_stage_moves_the_lstm():
    torch.manual_seed(0)
    config = KVAEConfig(a_dim=2, state_dim=3, num_bases=2, lstm_hidden=8, encoder_filters=4, encoder_layers=2,
                        decoder_start_channels=4, decoder_channels=8, decoder_blocks=2)
    model, guide = build_kvae((1, 16, 16), config)
    train = (torch.rand(6, 5, 1, 16, 16) > 0.9).float()
    before = [p.detach().clone() for p in model.dynamics.lstm.parameters()]
    warm_start(model, guide, train, WarmStartConfig(autoencoder_steps=2, frames_per_step=10, dynamics_steps=1, lstm_steps=2,
                                                   trajectory_penalty=30.0, batch_size=3))
    assert any(not torch.equal(b, p) for b, p in zip(before, model.dynamics.lstm.parameters()))
    with pytest.raises(ValueError, match="trajectory_penalty"):
        WarmStartConfig(trajectory_penalty=float("nan"))


def test_warm_start_score_against_a_hand_computation_and_its_mask():
    torch.manual_seed(0)
    model, guide = build((6,))
    x = frames((6,), n=4)
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[0, 1] = mask[2, 3] = False
    with torch.no_grad():
        codes = guide.posterior(x).mean  # (4, 5, 2)
        pixels = torch.nn.functional.binary_cross_entropy_with_logits(model.frame_logits(codes), x, reduction="none").sum(-1)  # (4, 5)
        log_prior = sum(KalmanPrior(model.dynamics, (1,), 5, 2).log_prob(codes[i : i + 1]).sum() for i in range(4))
    assert warm_start_score(model, guide, x) == pytest.approx(float((pixels.sum() - log_prior) / 20), rel=1e-5)
    assert warm_start_score(model, guide, x, mask) == pytest.approx(float((pixels[mask].sum() - log_prior) / 18), rel=1e-5)


def _weights(*modules):
    return [t.detach().clone() for m in modules for t in (*m.parameters(), *m.buffers())]


def _restarted(restarts: int, x: torch.Tensor):
    """A sabotaged first model (its decoder's output bias at -50: every pixel off), warm-started with
    ``restarts`` tries and no autoencoder stage, so the sabotage survives and a fresh try must win.
    Returns the model, guide, result, fresh pairs built and the next three draws of the random stream."""
    torch.manual_seed(1)
    model, guide = build((6,))
    with torch.no_grad():
        model.decoder.net[-1].bias.fill_(-50.0)
    rebuilt = []

    def rebuild():
        rebuilt.append(build((6,)))
        return rebuilt[-1]

    config = WarmStartConfig(autoencoder_steps=0, dynamics_steps=2, batch_size=4, seed=3, restarts=restarts)
    result = best_warm_start(model, guide, x, config, rebuild=rebuild)
    return model, guide, result, rebuilt, torch.rand(3)


def test_best_warm_start_of_one_is_the_plain_warm_start():
    config = WarmStartConfig(autoencoder_steps=4, frames_per_step=20, dynamics_steps=2, batch_size=4, seed=3)
    x = frames((6,), n=8)
    pairs, results = [], []
    for run in (warm_start, lambda m, g, x, c: best_warm_start(m, g, x, c, rebuild=lambda: build((6,)))):
        torch.manual_seed(1)
        model, guide = build((6,))
        results.append(run(model, guide, x, config))
        pairs.append(_weights(model, guide))
    assert results[0].scores == results[1].scores and len(results[0].scores) == 1 and results[1].chosen == 0
    assert all(torch.equal(a, b) for a, b in zip(*pairs))


def test_best_warm_start_keeps_the_lowest_score_and_the_runs_random_stream():
    x = frames((6,), n=8)
    _, _, single, _, stream_after_one = _restarted(1, x)
    model, guide, result, rebuilt, stream_after_three = _restarted(3, x)
    assert len(result.scores) == 3 and len(rebuilt) == 2 and result.scores[0] == single.scores[0]
    assert result.chosen > 0 and result.scores[result.chosen] == min(result.scores) < result.scores[0]
    assert all(torch.equal(a, b) for a, b in zip(_weights(model, guide), _weights(*rebuilt[result.chosen - 1])))
    assert warm_start_score(model, guide, x) == pytest.approx(min(result.scores), rel=1e-5)
    # the fresh tries run in a forked random state: afterwards the run draws what it would after one
    assert torch.equal(stream_after_one, stream_after_three)
    with pytest.raises(ValueError, match="restarts"):
        WarmStartConfig(restarts=0)
