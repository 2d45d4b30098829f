"""Flow-matching noise schedule and solvers: pure functions, no models, no CUDA, no I/O (k-diffusion style).

Conventions shared by everything here:

- Flow matching: ``x_sigma = (1 - sigma) * x0 + sigma * noise`` with sigma running from 1 (pure noise) to 0.
- A *denoiser* is ``denoise(x, sigma) -> x0``: the predicted clean sample for ``x`` at noise level ``sigma``.
  ``x`` is float32 and ``sigma`` is always a **0-dim float32 tensor on x's device** (one element of
  ``sigmas``), never a python float; an adapter that needs a per-batch vector expands it
  (``sigma.expand(x.shape[0])``) and does its own timestep scaling (``sigma * 1000``) and CFG.
  The returned tensor has x's shape; any float dtype is accepted and is upcast to float32.
- The transformer predicts a velocity ``v = noise - x0``; the adapter turns it into x0 with
  :func:`x0_from_velocity` and Euler turns it back with :func:`velocity_from_x0`. That round trip costs about
  one float32 ulp of ``x`` divided by sigma in ``v``, which the step then multiplies by ``sigma_next - sigma``
  (at most sigma): the error in the next ``x`` stays at ulp level.
- A sampler is ``sample_xxx(denoise, x, sigmas, callback=None) -> x0``. ``sigmas`` is 1-D, decreasing,
  ``len(sigmas) - 1`` steps, and ends at 0. It calls ``denoise`` once per step and ``callback`` once per step
  with a dict ``{'i', 'x', 'denoised', 'sigma'}``: step index, the sample at ``sigma = sigmas[i]``, the
  denoiser's prediction at that level, and ``sigma`` (0-dim tensor). An exception raised by the callback
  (e.g. ``Cancelled``) propagates unchanged, so cancelling costs at most the current step.
- Sample math is float32 whatever the input dtype, like diffusers' schedulers (they upcast in ``step``).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma: 0-dim float32) -> x0
Callback = Callable[[dict[str, Any]], None]

UNIPC_MAX_ORDER = 3  # the official FramePack sampler runs UniPC of order 3 after a 1, 2 warm-up
UNIPC_VARIANTS = ("bh1", "bh2")

# Flux "dynamic shift" line through (256 tokens, 0.5) and (4096 tokens, 1.15), as in FramePack/diffusers.
FLUX_MU_X1, FLUX_MU_Y1 = 256, 0.5
FLUX_MU_X2, FLUX_MU_Y2 = 4096, 1.15
FLUX_SHIFT_MAX = 7.0  # official FramePack clamps mu at ln 7: effectively shift 7 at 640x640


# ---------------------------------------------------------------------------------------------- schedule


def flux_mu(
    seq_len: int,
    x1: float = FLUX_MU_X1,
    y1: float = FLUX_MU_Y1,
    x2: float = FLUX_MU_X2,
    y2: float = FLUX_MU_Y2,
    exp_max: float = FLUX_SHIFT_MAX,
) -> float:
    """The flux time-shift parameter mu for a token count: linear in ``seq_len``, clamped at ``log(exp_max)``.

    FramePack passes the token count of the new latent window (``T * H * W // 4`` latent positions per
    2x2 patch); at 640x608 that is far past the line's end, so mu = ln 7.
    """
    slope = (y2 - y1) / (x2 - x1)
    intercept = y1 - slope * x1
    mu = slope * seq_len + intercept  # this operation order matches the official value to the last bit
    return min(mu, math.log(exp_max))


def flux_sigmas(steps: int, mu: float) -> torch.Tensor:
    """``steps + 1`` float32 sigmas from exactly 1 to exactly 0: ``linspace(1, 0)`` through the flux time shift.

    shift(t) = e^mu / (e^mu + (1/t - 1)) (sigma exponent 1), computed with the same float32 operations as the
    official FramePack code, so the values match it bit for bit. ``mu = log(s)`` gives the familiar
    "shift s" schedule ``s t / (1 + (s - 1) t)``.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)  # (steps + 1,)
    e_mu = math.exp(mu)
    sigmas = e_mu / (e_mu + (1.0 / t - 1.0))  # t = 0 -> 1/0 = inf -> sigma 0, no special case needed
    sigmas[0], sigmas[-1] = 1.0, 0.0  # already exact in float32; pinned so no rounding mode can move them
    return sigmas


# ------------------------------------------------------------------------------------- velocity <-> x0


def x0_from_velocity(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Clean-sample prediction from a flow-matching velocity ``v = noise - x0``: ``x0 = x - sigma * v`` (float32)."""
    return x.float() - sigma * v.float()


def velocity_from_x0(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """The velocity a denoiser implies: ``v = (x - x0) / sigma`` (float32). ``sigma`` must be > 0."""
    return (x.float() - x0.float()) / sigma


# ---------------------------------------------------------------------------------------------- samplers


def _check_sigmas(sigmas: torch.Tensor) -> None:
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 values, got shape {tuple(sigmas.shape)}")
    if not bool(torch.all(sigmas[:-1] > sigmas[1:])):
        raise ValueError("sigmas must be strictly decreasing")
    if not bool(sigmas[-2] > 0):
        raise ValueError("only the last sigma may be 0")


def _prepare(x: torch.Tensor, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    sigmas = torch.as_tensor(sigmas).to(device=x.device, dtype=torch.float32)
    _check_sigmas(sigmas)
    return x.to(torch.float32), sigmas


def sample_euler(
    denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, callback: Optional[Callback] = None
) -> torch.Tensor:
    """Flow-matching Euler, the step of diffusers' ``FlowMatchEulerDiscreteScheduler``.

    Per step: ``v = (x - x0) / sigma``; ``x <- x + (sigma_next - sigma) * v``. With sigmas ending at 0 the last
    step lands on (a rounding of) the last x0 prediction. Returns the float32 sample at ``sigmas[-1]``.
    """
    x, sigmas = _prepare(x, sigmas)
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]  # 0-dim float32
        denoised = denoise(x, sigma).float()
        if callback is not None:
            callback({"i": i, "x": x, "denoised": denoised, "sigma": sigma})
        v = velocity_from_x0(x, denoised, sigma)
        x = x + (sigma_next - sigma) * v
    return x


def _unipc_coefficients(
    t_prev: list[float], t: float, order: int, variant: str
) -> tuple[float, float, list[float], list[float], list[float]]:
    """Scalars of one UniPC step of ``order`` from ``t_prev[-1]`` to ``t`` (sigmas, both > 0).

    Returns ``(h_phi_1, B_h, rks, rhos_p, rhos_c)``: ``rks[k]`` is the lambda distance of the (k+1)-th older
    model output relative to the step size h; the predictor weights ``rhos_p`` (len order-1) and corrector
    weights ``rhos_c`` (len order) solve the order conditions ``R rho = b``. Scalars are float64, sample math
    stays float32: the ``h_phi_k / hh - 1/k!`` recursion cancels catastrophically for small h (near sigma 1 at
    shift 7, h ~ 1e-3), where the official float32 arithmetic gets ``b`` wrong by up to 20x at 50 steps. Those
    steps are so small that the output moves by only ~1e-6 either way, but float64 costs nothing here.
    """
    lambda_prev0 = -math.log(t_prev[-1])
    h = -math.log(t) - lambda_prev0  # > 0: lambda grows as sigma falls
    rks = [(-math.log(t_prev[-(k + 1)]) - lambda_prev0) / h for k in range(1, order)]  # each < 0
    rks_all = torch.tensor(rks + [1.0], dtype=torch.float64)  # (order,)

    hh = -h
    h_phi_1 = math.expm1(hh)  # e^{-h} - 1
    if variant == "bh1":
        B_h = hh
    elif variant == "bh2":
        B_h = math.expm1(hh)
    else:
        raise ValueError(f"variant must be one of {UNIPC_VARIANTS}, got {variant!r}")

    # Row i of R is rks**(i-1); b_i = i! * phi_{i+1}(h) (scaled) / B_h, phi built by the recursion below.
    h_phi_k = h_phi_1 / hh - 1.0
    factorial = 1
    R_rows, b = [], []
    for i in range(1, order + 1):
        R_rows.append(rks_all ** (i - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    R = torch.stack(R_rows)  # (order, order)
    b_t = torch.tensor(b, dtype=torch.float64)  # (order,)

    if order == 1:
        rhos_p: list[float] = []
    elif order == 2:
        rhos_p = [0.5]  # official choice at order 2 (the 1x1 solve would give b_1 instead)
    else:
        rhos_p = torch.linalg.solve(R[:-1, :-1], b_t[:-1]).tolist()
    rhos_c = [0.5] if order == 1 else torch.linalg.solve(R, b_t).tolist()
    return h_phi_1, B_h, rks, rhos_p, rhos_c


def sample_unipc(
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    callback: Optional[Callback] = None,
    variant: str = "bh1",
) -> torch.Tensor:
    """FramePack's "Better Flow Matching UniPC" (lllyasviel/FramePack ``uni_pc_fm.py``): multistep
    predictor-corrector of order up to 3 in lambda = -log(sigma) (not diffusers' log-SNR), one model call per step.

    Step 0 only evaluates the model at ``sigmas[0]``. Step i >= 1 moves x from ``sigmas[i-1]`` to ``sigmas[i]``
    with order ``min(i, 3, len(sigmas) - 2)`` (warm-up 1, 2, 3): predictor from the stored model outputs, one
    model call at the predicted point, then the corrector reuses that output (it is also the stored output for
    the next step, so the corrected point is never evaluated). The last sigma that is used is ``sigmas[-2]``;
    the result is the denoised prediction there, so the final interval to 0 is a first-order (x0) step and
    log(0) is never taken. ``sigmas`` must therefore end at 0.

    ``variant`` "bh1" (official default) or "bh2" only changes B(h); wherever the weights are solved from
    ``R rho = b`` it cancels, so the two differ only in the two warm-up steps with the fixed 0.5 weights.
    Callback: ``x`` is the corrected sample at ``sigma``; ``denoised`` is the model output used for it, which
    was evaluated at the predictor's point.
    """
    if variant not in UNIPC_VARIANTS:
        raise ValueError(f"variant must be one of {UNIPC_VARIANTS}, got {variant!r}")
    x, sigmas = _prepare(x, sigmas)
    if float(sigmas[-1]) != 0.0:
        raise ValueError("sample_unipc returns the clean prediction, so sigmas must end at 0")
    max_order = min(UNIPC_MAX_ORDER, len(sigmas) - 2)
    keep = max(max_order, 1)  # one step: just the single model output
    model_prev: list[torch.Tensor] = []  # last `keep` model outputs (x0 predictions), float32, x's shape
    t_prev: list[float] = []  # their sigmas

    sigma_values = sigmas.tolist()  # python floats for the coefficients: one device sync, not one per step
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]  # 0-dim float32, > 0
        t = sigma_values[i]
        if i == 0:
            model_t = denoise(x, sigma).float()
        else:
            order = min(i, max_order)
            h_phi_1, B_h, rks, rhos_p, rhos_c = _unipc_coefficients(t_prev, t, order, variant)
            m0 = model_prev[-1]
            # D1s[k] = (m_{k+1} - m0) / rk: divided differences of older outputs against the newest one
            D1s = [(model_prev[-(k + 2)] - m0) / rk for k, rk in enumerate(rks)]

            x_t_ = (t / t_prev[-1]) * x - h_phi_1 * m0  # the exponential-integrator (DDIM-like) part

            x_pred = x_t_
            if rhos_p:
                x_pred = x_t_ - B_h * sum(rho * d for rho, d in zip(rhos_p, D1s))
            model_t = denoise(x_pred, sigma).float()

            corr = rhos_c[-1] * (model_t - m0)
            if D1s:
                corr = corr + sum(rho * d for rho, d in zip(rhos_c[:-1], D1s))
            x = x_t_ - B_h * corr

        model_prev = (model_prev + [model_t])[-keep:]
        t_prev = (t_prev + [t])[-keep:]
        if callback is not None:
            callback({"i": i, "x": x, "denoised": model_t, "sigma": sigma})

    return model_prev[-1]
