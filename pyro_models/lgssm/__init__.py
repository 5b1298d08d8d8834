"""Exact inference for a linear-Gaussian state-space model (LGSSM) with missing data.

Generative process (column vectors), the LGSSM of Fraccaro et al. 2017, "A Disentangled
Recognition and Nonlinear Dynamics Model for Unsupervised Learning" (the Kalman VAE,
arXiv:1710.05741): eq. (1) gives the transition and emission densities and eq. (2) the
joint factorisation; the control input ``B_t u_t`` is omitted here::

    z_1 ~ N(init_loc, init_cov)
    z_t = A_t z_{t-1} + w_t,   w_t ~ N(0, Q),   t = 2..T     (A_t = trans_matrix[..., t-1, :, :])
    a_t = C_t z_t + v_t,       v_t ~ N(0, R),   t = 1..T     (C_t = obs_matrix[..., t-1, :, :])

With the 0-based time index of the tensors, ``trans_matrix[..., t, :, :]`` maps ``z[t-1]``
to ``z[t]``; ``trans_matrix[..., 0, :, :]`` is never used.  ``mask[..., t]`` is ``True``
when ``a[t]`` is observed (``None`` = all observed); a masked step contributes no
observation factor, and ``obs`` there may hold NaN.

Modules (pure functions, NamedTuples in and out, in the style of dynamax's
``linear_gaussian_ssm``):

* :mod:`.types`: :class:`LGSSM`, :class:`FilterResult`, :class:`SmoothResult` and the
  input preparation/validation.
* :mod:`.steps`: :func:`predict`, :func:`condition_on`, :func:`smooth_step` (one step,
  batched) and the sequential :func:`filter`, :func:`smooth`, :func:`rts_smooth` built
  from them.
* :mod:`.scan`: :func:`log_marginal`, a parallel tree over time with a closed-form
  (Fisher-identity) gradient.
* :mod:`.sample`: :func:`sample_posterior` (Pyro's parallel-scan FFBS).

Precision: the sequence functions cast their inputs to ``dtype`` (default
``torch.float64``) and return that dtype; the step functions compute in the dtype they are
given.  Validation of input values is opt-in (``validate_args``; ``None`` follows
``pyro.enable_validation``); shapes are always checked.  See ``docs/lgssm.md``.
"""

from .sample import sample_posterior
from .scan import log_marginal
from .steps import condition_on, filter, predict, rts_smooth, smooth, smooth_step
from .types import DEFAULT_DTYPE, LGSSM, FilterResult, SmoothResult

__all__ = [
    "DEFAULT_DTYPE",
    "LGSSM",
    "FilterResult",
    "SmoothResult",
    "log_marginal",
    "filter",
    "smooth",
    "rts_smooth",
    "sample_posterior",
    "predict",
    "condition_on",
    "smooth_step",
]
