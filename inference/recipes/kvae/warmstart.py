"""A warm start for Kalman VAE training, against posterior collapse. Not part of the original recipe.

Why: trained from scratch with the recipe, the KVAE on bouncing balls often collapses (the decoder draws
the walls and ignores a; ``docs/kvae.md`` has the runs). Two measured causes:

* a 2-d autoencoder on these frames has a plateau of about 150-200 Adam steps before the decoder uses
  its code at all (the ball is 28 of 1,024 pixels), and during it any KL pressure shrinks the code;
* the Kalman prior at initialisation (A = I, C ~ 0.05 N(0, 1)) expects a to stand still, so a code that
  follows the ball costs many nats; even a trained autoencoder's code is crushed within one epoch.

The warm start removes both before the recipe begins, in three stages:

1. **Autoencoder**: the encoder's mean and the decoder are trained as a deterministic autoencoder
   (a_t = mu(x_t), loss -log p(x_t | a_t) per frame; no prior, no noise) for ``autoencoder_steps`` on
   batches of ``frames_per_step`` frames drawn from all training frames. With ``trajectory_penalty``
   w > 0 the batches are whole sequences (``frames_per_step // T`` of them) and the loss adds
   ``w * mean_t sum_d |a_{t+1,d} - 2 a_{t,d} + a_{t-1,d}| / std_d(a)``: codes whose trajectories are straight
   between sparse kinks (a ball's position between bounces) are preferred to any other invertible warp
   of them, which a linear-Gaussian prior could not follow. Dividing by the batch's code spread keeps
   the penalty from being dodged by shrinking the codes.
2. **Standardise**: the encoder's mean layer is rescaled so that the codes have zero mean and unit
   standard deviation per dimension over the training frames; the decoder's first dense layer absorbs
   the inverse map, so the decoded frames are unchanged.
3. **Dynamics**: the LGSSM's bases A^(k), C^(k) and a_0 (the LSTM stays as initialised) are fitted by
   maximising log p(a) of codes drawn from the guide q(a | x) (detached) for ``dynamics_steps``; then,
   for ``lstm_steps`` more, every dynamics parameter, the LSTM that mixes the bases included.

With ``restarts`` R > 1 the three stages run R times, the first on the model as built and each further
one on a freshly initialised model (:func:`best_warm_start`), and the run keeps the warm start with the
lowest :func:`warm_start_score`: -log p(x_t | mu(x_t)) - log p(a) per frame, the codes' reconstruction
and the fitted prior's density of them, on the first ``score_sequences`` training sequences (the
penalty left out; no label used). Measured on the full bouncing balls, the seed whose warm start
scored worst on both stage losses was the one whose training lagged (``docs/benchmarks.md``).

Then training proceeds with the recipe (ELBO, LSTM freeze, learning-rate decay) from these weights.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pyro_models.imputation import zero_missing
from pyro_models.kvae import KVAE, KalmanPrior, KVAEGuide

from ...runs import failpoints
from ...training import TrainConfig


@dataclass
class WarmStartConfig:
    """Lengths and optimiser of the warm start (stages in the module docstring)."""

    autoencoder_steps: int = 1000  # stage 1; the plateau on bouncing balls lasts ~150-300 steps
    frames_per_step: int = 160  # stage 1 batch: frames drawn from all training frames
    trajectory_penalty: float = 0.0  # stage 1: weight of the straight-trajectory penalty (0: frames, no penalty)
    dynamics_steps: int = 300  # stage 3: the bases
    lstm_steps: int = 0  # stage 3, then: every dynamics parameter, the LSTM included
    batch_size: int = 32  # stage 3 batch: sequences
    lr: float = 0.007  # Adam, both stages (the recipe's initial rate)
    seed: int = 0  # order of the batches
    restarts: int = 1  # warm starts from fresh initialisations; the lowest warm_start_score is kept
    score_sequences: int = 256  # training sequences (the first ones) that warm_start_score reads

    def __post_init__(self):
        for name in ("autoencoder_steps", "dynamics_steps", "lstm_steps", "trajectory_penalty"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected >= 0, got {getattr(self, name)}")
        for name in ("batch_size", "frames_per_step", "restarts", "score_sequences"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name}: expected an integer >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")


def warm_start_for(train_config: TrainConfig, autoencoder_steps: int, dynamics_steps: int, lstm_steps: int = 0,
                   trajectory_penalty: float = 0.0, lr: Optional[float] = None, restarts: int = 1) -> Optional[WarmStartConfig]:
    """The warm start of a run: ``autoencoder_steps``, ``dynamics_steps`` and ``lstm_steps`` long, on the
    run's batch size and seed and its learning rate unless ``lr`` is given, best of ``restarts``; None for
    ``autoencoder_steps == 0`` (the original recipe, no warm start)."""
    if autoencoder_steps == 0:
        return None
    return WarmStartConfig(autoencoder_steps=autoencoder_steps, dynamics_steps=dynamics_steps, lstm_steps=lstm_steps,
                           trajectory_penalty=trajectory_penalty, batch_size=train_config.batch_size,
                           lr=train_config.lr if lr is None else lr, seed=train_config.seed, restarts=restarts)


# restart r draws its initialisation from torch seed ``seed + r * RESTART_SEED_STRIDE`` and its batches
# from that seed too, far from the ``seed + 1`` of the LSTM stage
RESTART_SEED_STRIDE = 1000


class WarmStartResult(NamedTuple):
    """Final losses (per frame) of the autoencoder and dynamics stages, the codes' mean and standard
    deviation before standardising, each ``(a_dim,)``, and, over the restarts tried, the
    :func:`warm_start_score` of each and the index of the one kept (one restart: ``[score]``, 0)."""

    autoencoder_loss: float
    dynamics_loss: float
    code_mean: torch.Tensor
    code_std: torch.Tensor
    scores: Tuple[float, ...] = ()
    chosen: int = 0


def _batches(num: int, size: int, steps: int, seed: int, desc: str, progress: bool):
    """``steps`` index batches of ``min(size, num)`` draws from range(num), with a tqdm bar."""
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        yield torch.randint(num, (min(size, num),), generator=generator)
        failpoints.reach("warm_start")


def observed_frames(train: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The frames of ``train (N, T, *frame_shape)`` that ``mask (N, T)`` marks observed (all without a
    mask), ``(frames, *frame_shape)``."""
    if mask is None:
        return train.reshape((-1,) + train.shape[2:])  # (N * T, *frame_shape)
    return train[mask.to(train.device)]


def pretrain_autoencoder(model: KVAE, guide: KVAEGuide, train: torch.Tensor, config: WarmStartConfig,
                         progress: bool = False, mask: Optional[torch.Tensor] = None) -> float:
    """Stage 1 on the observed frames of ``train (N, T, *frame_shape)`` (``mask (N, T)``, True = observed;
    None: all): returns the last loss, nats per frame."""
    encoder, decoder = guide.encoder, model.decoder
    optimiser = torch.optim.Adam([*encoder.body.parameters(), *encoder.head.loc.parameters(), *decoder.parameters()], lr=config.lr)
    if config.trajectory_penalty > 0:
        return _pretrain_on_sequences(encoder, decoder, optimiser, train, config, progress, mask)
    all_frames = observed_frames(train, mask)  # (frames, *frame_shape)
    loss = torch.tensor(float("nan"))
    batches = _batches(len(all_frames), config.frames_per_step, config.autoencoder_steps, config.seed, "warm start: autoencoder", progress)
    for index in batches:
        frames = all_frames[index]  # (frames_per_step, *frame_shape)
        loc, _ = encoder(frames)
        logits = decoder(loc)
        loss = F.binary_cross_entropy_with_logits(logits, frames, reduction="sum") / frames.shape[0]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return float(loss.detach())


def trajectory_kinks(codes: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The stage-1 penalty: mean over triples of frames of ``sum_d |a_{t+1} - 2 a_t + a_{t-1}|_d / std_d``,
    for ``codes (batch, T, a_dim)``, the std over the batch's (observed) codes; with ``mask (batch, T)``
    only triples of observed frames count."""
    spread = (codes[mask] if mask is not None else codes.reshape(-1, codes.shape[-1])).std(0).clamp_min(torch.finfo(codes.dtype).eps)
    kinks = ((codes[:, 2:] - 2 * codes[:, 1:-1] + codes[:, :-2]).abs() / spread).sum(-1)  # (batch, T - 2)
    if mask is None:
        return kinks.mean()
    triples = (mask[:, 2:] & mask[:, 1:-1] & mask[:, :-2]).to(kinks.dtype)  # (batch, T - 2)
    return (kinks * triples).sum() / triples.sum().clamp_min(1)


def _pretrain_on_sequences(encoder, decoder, optimiser, train: torch.Tensor, config: WarmStartConfig, progress: bool,
                           mask: Optional[torch.Tensor]) -> float:
    """Stage 1 with the trajectory penalty: batches of ``frames_per_step // T`` whole sequences of
    ``train (N, T, *frame_shape)``; the reconstruction term counts observed frames only."""
    num, steps = train.shape[0], train.shape[1]
    loss = torch.tensor(float("nan"))
    batches = _batches(num, max(1, config.frames_per_step // steps), config.autoencoder_steps, config.seed, "warm start: autoencoder", progress)
    for index in batches:
        x = train[index]  # (seqs, T, *frame_shape)
        observed = None if mask is None else mask[index].to(x.device)  # (seqs, T)
        frames = x.reshape((-1,) + x.shape[2:])  # (seqs * T, *frame_shape)
        loc, _ = encoder(frames)  # (seqs * T, a_dim)
        pixels = F.binary_cross_entropy_with_logits(decoder(loc), frames, reduction="none").flatten(1).sum(-1)  # (seqs * T,)
        weights = torch.ones_like(pixels) if observed is None else observed.reshape(-1).to(pixels.dtype)
        codes = loc.reshape(x.shape[0], steps, -1)  # (seqs, T, a_dim)
        loss = (pixels * weights).sum() / weights.sum().clamp_min(1) + config.trajectory_penalty * trajectory_kinks(codes, observed)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return float(loss.detach())


@torch.no_grad()
def standardise_codes(model: KVAE, guide: KVAEGuide, train: torch.Tensor, chunk: int = 256,
                      mask: Optional[torch.Tensor] = None):
    """Stage 2: codes of the observed frames of ``train (N, T, *frame_shape)`` (``mask``) to zero mean and
    unit std per dimension; the decoder's first layer absorbs the inverse map. Returns the old mean and
    std ``(a_dim,)``."""
    head, dense = guide.encoder.head, model.decoder.input_layer
    codes = torch.cat([guide.posterior(train[i : i + chunk]).mean for i in range(0, len(train), chunk)])  # (N, T, a_dim)
    codes = codes[mask.to(codes.device)] if mask is not None else codes.reshape(-1, head.loc.out_features)  # (frames, a_dim)
    mean, std = codes.mean(0), codes.std(0).clamp_min(torch.finfo(codes.dtype).eps)
    head.loc.weight.div_(std.unsqueeze(-1))
    head.loc.bias.sub_(mean).div_(std)
    dense.bias.add_(dense.weight @ mean)
    dense.weight.mul_(std)
    return mean, std


@torch.no_grad()
def posterior_params(guide: KVAEGuide, train: torch.Tensor, chunk: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """The loc and scale of q(a | x) for every sequence of ``train (N, T, *frame_shape)``, each
    ``(N, T, a_dim)``, encoded ``chunk`` sequences at a time."""
    parts = [guide.posterior(train[i : i + chunk]).base_dist for i in range(0, len(train), chunk)]
    return torch.cat([p.loc for p in parts]), torch.cat([p.scale for p in parts])


def fit_dynamics(model: KVAE, guide: KVAEGuide, train: torch.Tensor, config: WarmStartConfig,
                 progress: bool = False) -> float:
    """Stage 3: maximise log p(a) over A^(k), C^(k), a_0 for a ~ q(a | x) (detached), x from
    ``train (N, T, *frame_shape)``. Returns the last loss, nats per frame. The encoder does not change in
    this stage, so q(a | x) of every sequence is computed once and each step draws from its batch's."""
    dynamics = model.dynamics
    loc, scale = posterior_params(guide, train)  # each (N, T, a_dim)
    loss = _fit_prior(dynamics, [dynamics.trans_bases, dynamics.obs_bases, dynamics.a0], loc, scale, config,
                      config.dynamics_steps, config.seed, "warm start: dynamics", progress)
    if config.lstm_steps > 0:
        loss = _fit_prior(dynamics, list(dynamics.parameters()), loc, scale, config, config.lstm_steps, config.seed + 1,
                          "warm start: dynamics with the LSTM", progress)
    return loss


def _fit_prior(dynamics, parameters, loc: torch.Tensor, scale: torch.Tensor, config: WarmStartConfig, steps: int,
               seed: int, desc: str, progress: bool) -> float:
    """Adam on ``parameters`` for ``steps``, maximising log p(a) for a ~ N(loc, scale) (each ``(N, T, a_dim)``)."""
    optimiser = torch.optim.Adam(parameters, lr=config.lr)
    loss = torch.tensor(float("nan"))
    for index in _batches(len(loc), config.batch_size, steps, seed, desc, progress):
        with torch.no_grad():
            a = torch.distributions.Normal(loc[index], scale[index]).sample()  # (batch, T, a_dim)
        prior = KalmanPrior(dynamics, a.shape[:1], a.shape[1], a.shape[2])
        loss = -prior.log_prob(a).mean() / a.shape[1]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return float(loss.detach())


def warm_start(model: KVAE, guide: KVAEGuide, train: torch.Tensor, config: WarmStartConfig,
               progress: bool = False, mask: Optional[torch.Tensor] = None) -> WarmStartResult:
    """The three stages on ``train (N, T, *frame_shape)`` (on the modules' device), in training mode.
    With gaps (``mask (N, T)``, True = observed), stages 1 and 2 use the observed frames only; stage 3
    fits the prior to codes of every frame, as the ELBO scores them (the guide's codes of the zeroed
    missing frames are its q(a_t) there)."""
    if train.dim() != len(model.frame_shape) + 2 or tuple(train.shape[2:]) != model.frame_shape:
        raise ValueError(f"train: expected shape (N, T, {', '.join(map(str, model.frame_shape))}), got {tuple(train.shape)}")
    if mask is not None:
        train = zero_missing(train, mask)  # stage 3 encodes every frame: the gaps as blank frames, as the guide does
    train = train.to(next(model.parameters()).device)
    model.train(), guide.train()
    autoencoder_loss = pretrain_autoencoder(model, guide, train, config, progress, mask)
    mean, std = standardise_codes(model, guide, train, mask=mask)
    dynamics_loss = fit_dynamics(model, guide, train, config, progress)
    score = warm_start_score(model, guide, train[: config.score_sequences], None if mask is None else mask[: config.score_sequences])
    return WarmStartResult(autoencoder_loss, dynamics_loss, mean.cpu(), std.cpu(), (score,), 0)


@torch.no_grad()
def warm_start_score(model: KVAE, guide: KVAEGuide, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> float:
    """How well a warm start fits ``x (N, T, *frame_shape)`` (``mask (N, T)``, True = observed; None:
    all), lower is better: with the codes a = mu(x) of the guide's mean, -log p(x_t | a_t) summed over
    the observed frames plus -log p(a) under the Kalman prior (every frame, as stage 3 fits it), divided
    by the frames counted. Label-free: the warm start's own terms without the trajectory penalty."""
    codes = guide.posterior(x).mean  # (N, T, a_dim)
    logits = model.decoder(codes.reshape(-1, codes.shape[-1]))  # (N * T, *frame_shape)
    pixels = F.binary_cross_entropy_with_logits(logits, x.reshape(logits.shape), reduction="none").flatten(1).sum(-1)  # (N * T,)
    observed = torch.ones_like(pixels) if mask is None else mask.reshape(-1).to(pixels.dtype).to(pixels.device)
    prior = KalmanPrior(model.dynamics, codes.shape[:1], codes.shape[1], codes.shape[2])
    frames = observed.sum().clamp_min(1)
    return float(((pixels * observed).sum() - prior.log_prob(codes).sum()) / frames)


def best_warm_start(model: KVAE, guide: KVAEGuide, train: torch.Tensor, config: WarmStartConfig,
                    rebuild: Callable[[], Tuple[KVAE, KVAEGuide]], progress: bool = False,
                    mask: Optional[torch.Tensor] = None) -> WarmStartResult:
    """:func:`warm_start` ``config.restarts`` times, keeping the lowest :func:`warm_start_score`; the
    winner's weights end in ``model`` and ``guide``. Restart 0 runs on ``model`` and ``guide`` as given,
    exactly as a single warm start does (so one restart changes nothing); restart r >= 1 on a fresh pair
    from ``rebuild()``, initialised and trained under torch seed ``config.seed + r * RESTART_SEED_STRIDE``
    inside a forked random state, so the run's random stream afterwards is the same whoever wins."""
    first = warm_start(model, guide, train, config, progress, mask)
    best, best_state, scores = first, None, list(first.scores)
    for restart in range(1, config.restarts):
        seed = config.seed + restart * RESTART_SEED_STRIDE
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh_model, fresh_guide = rebuild()
            fresh_model.to(next(model.parameters()).device), fresh_guide.to(next(model.parameters()).device)
            result = warm_start(fresh_model, fresh_guide, train, replace(config, seed=seed), progress, mask)
        scores.append(result.scores[0])
        if result.scores[0] < min(scores[:-1]):
            best, best_state = result._replace(chosen=restart), (fresh_model.state_dict(), fresh_guide.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state[0]), guide.load_state_dict(best_state[1])
    return best._replace(scores=tuple(scores))
