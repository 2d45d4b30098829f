"""Sampler tests on an analytic denoiser: no models, CPU only, fast.

Data: every element x0 ~ N(MU_D, SD_D^2), independent. Flow matching: x_sigma = (1 - sigma) x0 + sigma * noise.
Then x_sigma ~ N((1 - sigma) MU_D, var(sigma)) with var = (1 - sigma)^2 SD_D^2 + sigma^2, and the exact
posterior mean (the ideal denoiser) is
    E[x0 | x_sigma] = MU_D + (1 - sigma) SD_D^2 / var(sigma) * (x_sigma - (1 - sigma) MU_D).
The probability-flow ODE dx/dsigma = (x - E[x0 | x]) / sigma is linear, so its solution keeps each element's
z-score: x(sigma) = (1 - sigma) MU_D + sqrt(var(sigma)) * noise, and x(0) = MU_D + SD_D * noise. The reference
is a fine RK4 solution of that ODE, checked against this closed form.
"""
from __future__ import annotations

import math

import pytest
import torch

from framepack_ui.engine.sampling import (
    flux_mu,
    flux_sigmas,
    sample_euler,
    sample_unipc,
    velocity_from_x0,
    x0_from_velocity,
)
from framepack_ui.errors import Cancelled

MU_D, SD_D = 0.3, 0.5
SHIFT = 7.0  # what FramePack F1 gets at 640x608 (mu clamped at ln 7)
SHAPE = (2, 16, 3, 8, 8)  # (B, C, T, H, W): 6144 independent elements


def posterior_mean(x: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """Exact E[x0 | x_sigma] in float64 for the Gaussian data above."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    var = (1 - s) ** 2 * SD_D**2 + s**2
    return MU_D + (1 - s) * SD_D**2 / var * (x.double() - (1 - s) * MU_D)


def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return posterior_mean(x, sigma).float()


def velocity_model(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """What a flow-matching transformer would predict: v = (x - x0) / sigma = noise - x0 (in expectation)."""
    return ((x.double() - posterior_mean(x, sigma)) / torch.as_tensor(sigma, dtype=torch.float64)).float()


def denoise_via_velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The engine's adapter path: the model gives v, the sampler gets x0 = x - sigma * v."""
    return x0_from_velocity(x, velocity_model(x, sigma), sigma)


@pytest.fixture(scope="module")
def noise() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(1234))


def rk4_reference(noise: torch.Tensor, steps: int = 2000, sigma_end: float = 1e-6) -> torch.Tensor:
    """x(0) of the probability-flow ODE: float64 RK4 on a shift-7 grid from 1 to sigma_end (the right-hand
    side is 0/0 at sigma = 0), then one exact denoiser call, whose error is O(sigma_end^2)."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    grid = SHIFT * t / (1 + (SHIFT - 1) * t)
    grid[-1] = sigma_end

    def f(x: torch.Tensor, s: float) -> torch.Tensor:  # (x - E[x0|x]) / s with python-float scalars: fast
        gain = (1 - s) * SD_D**2 / ((1 - s) ** 2 * SD_D**2 + s**2)
        return (x - gain * x + (gain * (1 - s) - 1) * MU_D) / s

    x = noise.double()
    for s0, s1 in zip(grid[:-1].tolist(), grid[1:].tolist()):
        h = s1 - s0
        k1 = f(x, s0)
        k2 = f(x + h / 2 * k1, s0 + h / 2)
        k3 = f(x + h / 2 * k2, s0 + h / 2)
        k4 = f(x + h * k3, s1)
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return posterior_mean(x, sigma_end)


@pytest.fixture(scope="module")
def reference(noise: torch.Tensor) -> torch.Tensor:
    return rk4_reference(noise)


def assert_allclose(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 0.0, atol: float = 0.0) -> None:
    # torch.allclose rather than torch.testing.assert_close: the latter's first call imports for seconds
    assert actual.shape == expected.shape
    diff = (actual.double() - expected.double()).abs().max().item()
    assert torch.allclose(actual.double(), expected.double(), rtol=rtol, atol=atol), f"max abs diff {diff:.3g}"


def rms_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return (out.double() - reference).pow(2).mean().sqrt().item()


# ---------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("steps", [1, 4, 25, 50])
@pytest.mark.parametrize("mu", [0.0, 0.5, math.log(SHIFT)])
def test_flux_sigmas_shape_and_ends(steps: int, mu: float) -> None:
    sigmas = flux_sigmas(steps, mu)
    assert sigmas.shape == (steps + 1,) and sigmas.dtype == torch.float32
    assert sigmas[0].item() == 1.0 and sigmas[-1].item() == 0.0
    assert bool(torch.all(sigmas[:-1] > sigmas[1:]))
    t = torch.linspace(1, 0, steps + 1, dtype=torch.float64)[:-1]
    expected = math.exp(mu) / (math.exp(mu) + (1 / t - 1))  # float64 formula
    assert_allclose(sigmas[:-1].double(), expected, rtol=1e-6, atol=1e-7)
    if mu == 0.0:  # no shift
        assert_allclose(sigmas, torch.linspace(1, 0, steps + 1), rtol=0, atol=1e-7)


def test_flux_sigmas_match_diffusers_dynamic_shift() -> None:
    np = pytest.importorskip("numpy")
    diffusers = pytest.importorskip("diffusers")
    mu = math.log(SHIFT)
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.0, 26)[:-1], mu=mu)
    assert_allclose(scheduler.sigmas, flux_sigmas(25, mu), rtol=1e-6, atol=1e-7)


def test_flux_mu_clamps_at_log7() -> None:
    assert flux_mu(256) == pytest.approx(0.5)
    assert flux_mu(4096) == pytest.approx(1.15)
    assert flux_mu(2176) == pytest.approx(0.825)  # halfway along the line, unclamped
    # 640x608 -> latent 9 x 80 x 76 -> 2x2 patches: 13,680 tokens, far past the clamp (about 8,800 tokens)
    assert flux_mu(9 * 80 * 76 // 4) == pytest.approx(math.log(7.0))
    assert flux_mu(10**9) == pytest.approx(math.log(7.0))
    assert flux_mu(10**9, exp_max=3.0) == pytest.approx(math.log(3.0))
    assert flux_mu(8000) < math.log(7.0) == flux_mu(9000)


# ---------------------------------------------------------------------------------------------- accuracy


def test_reference_ode_solution_matches_closed_form(noise: torch.Tensor, reference: torch.Tensor) -> None:
    closed_form = MU_D + SD_D * noise.double()
    assert (reference - closed_form).abs().max().item() < 1e-8


def test_unipc_error_falls_with_steps(noise: torch.Tensor, reference: torch.Tensor) -> None:
    mu = math.log(SHIFT)
    errors = [rms_error(sample_unipc(denoise, noise, flux_sigmas(n, mu)), reference) for n in (10, 25, 50)]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < errors[0] / 5, errors


@pytest.mark.parametrize("steps, documented_unipc", [(25, 6.5e-2), (50, 3.0e-2)])
def test_unipc_beats_euler_same_steps(
    noise: torch.Tensor, reference: torch.Tensor, steps: int, documented_unipc: float
) -> None:
    # Measured here (RMS over elements): 25 steps UniPC 6.2e-2 vs Euler 1.1e-1; 50 steps 2.3e-2 vs 5.7e-2.
    sigmas = flux_sigmas(steps, math.log(SHIFT))
    err_unipc = rms_error(sample_unipc(denoise, noise, sigmas), reference)
    err_euler = rms_error(sample_euler(denoise, noise, sigmas), reference)
    assert err_unipc < 0.7 * err_euler, (err_unipc, err_euler)
    assert err_unipc < 1.5 * documented_unipc, err_unipc


def test_unipc_bh2_runs_and_beats_euler(noise: torch.Tensor, reference: torch.Tensor) -> None:
    # bh2 differs from bh1 only in the two warm-up steps (B(h) cancels in solved weights): ~5e-7 here.
    sigmas = flux_sigmas(25, math.log(SHIFT))
    err_bh2 = rms_error(sample_unipc(denoise, noise, sigmas, variant="bh2"), reference)
    assert err_bh2 < 0.7 * rms_error(sample_euler(denoise, noise, sigmas), reference)


def test_unipc_two_steps_is_euler(noise: torch.Tensor) -> None:
    # Two steps = one model call at sigma 1, one first-order (DDIM/Euler) move, one call, its x0: Euler's path.
    sigmas = flux_sigmas(2, math.log(SHIFT))
    assert_allclose(sample_unipc(denoise, noise, sigmas), sample_euler(denoise, noise, sigmas), atol=1e-6)


def test_velocity_round_trip(noise: torch.Tensor) -> None:
    sigma = torch.tensor(0.37)
    v = velocity_model(noise, sigma)
    assert_allclose(velocity_from_x0(noise, x0_from_velocity(noise, v, sigma), sigma), v, atol=1e-5)


def test_euler_matches_diffusers_flowmatch_scheduler(noise: torch.Tensor) -> None:
    diffusers = pytest.importorskip("diffusers")
    sigmas = flux_sigmas(25, math.log(SHIFT))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()  # shift 1: sigmas pass through unchanged
    scheduler.set_timesteps(sigmas=sigmas[:-1].tolist())  # it appends the terminal 0 itself
    assert torch.equal(scheduler.sigmas, sigmas)

    x = noise.clone()
    for i, t in enumerate(scheduler.timesteps):
        x = scheduler.step(velocity_model(x, sigmas[i]), t, x).prev_sample
    ours = sample_euler(denoise_via_velocity, noise, sigmas)
    assert_allclose(ours, x, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------- contract


@pytest.mark.parametrize("sampler", [sample_unipc, sample_euler])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 25])
def test_unipc_one_model_call_per_step(noise: torch.Tensor, sampler, steps: int) -> None:
    sigmas = flux_sigmas(steps, math.log(SHIFT))
    seen_sigmas, events = [], []

    def counting_denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        assert x.dtype == torch.float32 and x.shape == SHAPE
        assert isinstance(sigma, torch.Tensor) and sigma.ndim == 0 and sigma.dtype == torch.float32
        seen_sigmas.append(sigma.item())
        return denoise(x, sigma)

    out = sampler(counting_denoise, noise, sigmas, callback=events.append)
    assert out.dtype == torch.float32 and out.shape == SHAPE
    assert seen_sigmas == sigmas[:-1].tolist()  # never sigma 0, each level once, in order
    assert [e["i"] for e in events] == list(range(steps))
    assert all(set(e) == {"i", "x", "denoised", "sigma"} for e in events)
    assert [e["sigma"].item() for e in events] == sigmas[:-1].tolist()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("sampler", [sample_unipc, sample_euler])
def test_callback_exception_stops_sampling(noise: torch.Tensor, sampler) -> None:
    calls = []

    def counting_denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        calls.append(sigma.item())
        return denoise(x, sigma)

    def cancel_at_3(event: dict) -> None:
        if event["i"] == 3:
            raise Cancelled()

    with pytest.raises(Cancelled):
        sampler(counting_denoise, noise, flux_sigmas(25, math.log(SHIFT)), callback=cancel_at_3)
    assert len(calls) == 4  # steps 0..3 ran, nothing after the cancel


@pytest.mark.parametrize("sampler", [sample_unipc, sample_euler])
def test_input_dtype_is_upcast(noise: torch.Tensor, sampler) -> None:
    """A bfloat16 sample and float64 (or python float) sigmas: the denoiser and the callback see float32 from the
    first step on, and the result is float32."""
    seen = []

    def recording_denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        seen.append((x.dtype, sigma.dtype))
        return denoise(x, sigma)

    events = []
    for sigmas in (flux_sigmas(10, math.log(SHIFT)).double(), flux_sigmas(10, math.log(SHIFT)).tolist()):
        out = sampler(recording_denoise, noise.to(torch.bfloat16), sigmas, callback=events.append)
        assert out.dtype == torch.float32
    assert seen and set(seen) == {(torch.float32, torch.float32)}
    assert {e["x"].dtype for e in events} == {e["sigma"].dtype for e in events} == {torch.float32}


def test_unipc_rejects_bad_input(noise: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="^sample_unipc returns the clean prediction, so sigmas must end at 0$"):
        sample_unipc(denoise, noise, flux_sigmas(10, 1.0)[:-1])
    with pytest.raises(ValueError, match="variant must be one of .*'bh3'"):
        sample_unipc(denoise, noise, flux_sigmas(10, 1.0), variant="bh3")
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        flux_sigmas(0, 1.0)


@pytest.mark.parametrize("sampler", [sample_unipc, sample_euler])
@pytest.mark.parametrize("sigmas, message", [
    ([1.0], r"1-D with at least 2 values, got shape \(1,\)"),
    ([[1.0, 0.0]], r"1-D with at least 2 values, got shape \(1, 2\)"),
    ([1.0, 0.5, 0.5, 0.0], "^sigmas must be strictly decreasing$"),  # a repeated level
    ([1.0, 0.5, 0.7, 0.0], "^sigmas must be strictly decreasing$"),  # rises again below the first sigma
    ([1.0, 0.5, 0.0, -0.0], "^sigmas must be strictly decreasing$"),
])
def test_samplers_refuse_sigmas_that_are_no_schedule(noise: torch.Tensor, sampler, sigmas, message) -> None:
    calls = []
    with pytest.raises(ValueError, match=message):
        sampler(lambda x, s: calls.append(1) or denoise(x, s), noise, torch.tensor(sigmas))
    assert not calls  # refused before any model call


def test_only_the_last_sigma_may_be_0(noise: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="^only the last sigma may be 0$"):  # decreasing, but 0 before the end
        sample_euler(denoise, noise, torch.tensor([1.0, 0.0, -1.0]))
    assert torch.isfinite(sample_euler(denoise, noise, torch.tensor([1.0, 1e-6, 0.0]))).all()


# ---------------------------------------------------------------------------------------------- golden values
# Error bounds cannot tell a wrong coefficient from a right one (a corrector that uses the oldest model output
# sits nearer the ODE reference than the official method on the problem above): these pin the method itself.
# The expected values are FramePack's "Better Flow Matching UniPC", bh1 (lllyasviel/FramePack,
# diffusers_helper/k_diffusion/uni_pc_fm.py), computed ONCE by golden_unipc_bh1() below: an independent
# implementation in 50-digit mpmath from the definition (UniPC, Zhao et al. 2023, data prediction with
# B(h) = h, in lambda = -log(sigma); phi_k from its closed form, the order conditions solved by mpmath; the
# official fixed weights 0.5 for the order-2 predictor and the order-1 corrector), on the exact posterior-mean
# denoiser above, four elements, seven steps (orders 1, 2, 3, 3, 3, 3; sigmas exact in float32), rounded to
# float64. Recompute: `PYTHONPATH=. python tests/test_sampling.py`. sample_unipc, in float32, is 2.4e-7 off.
GOLDEN_NOISE = ("-1.5", "-0.25", "0.625", "2.0")
GOLDEN_SIGMAS = ("1.0", "0.96875", "0.9375", "0.875", "0.75", "0.5625", "0.3125", "0.0")
GOLDEN_UNIPC_X = (  # the sample after steps 1..6 (step 0 only evaluates the model)
    (-1.4439419784748542, -0.23284449641247568, 0.6149237410311892, 1.9471309712998055),
    (-1.3882838835821207, -0.2157556472636868, 0.6050141181592169, 1.8947951781094943),
    (-1.2783466689706309, -0.1818077781617718, 0.5857694454044295, 1.7919622252941745),
    (-1.065518785841905, -0.11508646430698417, 0.5502161607674604, 1.5956917144558733),
    (-0.7740211455703195, -0.01962852426171993, 0.5084463106542998, 1.3382781940937594),
    (-0.49234293565393844, 0.08981784405767693, 0.4973303898558077, 1.1377072475385845),
)
GOLDEN_UNIPC_DENOISED = (  # the model output of steps 0..6; the last one is the result
    (0.3, 0.3, 0.3, 0.3),
    (0.2879063719115735, 0.29798439531859555, 0.30503901170351105, 0.3161248374512354),
    (0.2750138836217682, 0.2958356472702947, 0.31041088182426324, 0.33331482183764244),
    (0.24656459081852508, 0.2910940984697542, 0.32226475382561454, 0.37124721224196655),
    (0.17669976842416651, 0.2794499614040278, 0.3513750964899306, 0.464400308767778),
    (0.028043754346505828, 0.254673959057751, 0.4133151023556226, 0.6626083275379923),
    (-0.267221366691497, 0.20546310555141717, 0.536342236121457, 1.0562951555886626),
)
# float32 sample math over seven steps: 2.4e-7 measured. The nearest wrong methods tried: bh2 (4e-6 off), the
# order-2 predictor weight 0.25 instead of 0.5 (2.4e-6 in a model output).
GOLDEN_ATOL = 1e-6


def test_unipc_bh1_matches_golden_values_step_by_step() -> None:
    steps = []
    out = sample_unipc(denoise, torch.tensor([float(v) for v in GOLDEN_NOISE]),
                       torch.tensor([float(s) for s in GOLDEN_SIGMAS]), callback=steps.append)
    assert len(steps) == len(GOLDEN_SIGMAS) - 1
    assert_allclose(steps[0]["x"], torch.tensor([float(v) for v in GOLDEN_NOISE]))  # step 0 does not move x
    for event, expected in zip(steps[1:], GOLDEN_UNIPC_X):
        assert_allclose(event["x"], torch.tensor(expected, dtype=torch.float64), atol=GOLDEN_ATOL)
    for event, expected in zip(steps, GOLDEN_UNIPC_DENOISED):
        assert_allclose(event["denoised"], torch.tensor(expected, dtype=torch.float64), atol=GOLDEN_ATOL)
    assert_allclose(out, torch.tensor(GOLDEN_UNIPC_DENOISED[-1], dtype=torch.float64), atol=GOLDEN_ATOL)


def golden_unipc_bh1(digits: int = 50) -> tuple[list[list[float]], list[list[float]]]:
    """The golden values above, from the definition in mpmath: (x after each step, model output of each step).
    Not a test: run once by hand (`PYTHONPATH=. python tests/test_sampling.py`) and the printout pasted above."""
    import mpmath as mp

    mp.mp.dps = digits
    mu_d, sd_d = mp.mpf(str(MU_D)), mp.mpf(str(SD_D))

    def posterior_mean(x: list, s) -> list:  # the exact denoiser of the module docstring
        var = (1 - s) ** 2 * sd_d**2 + s**2
        return [mu_d + (1 - s) * sd_d**2 / var * (xi - (1 - s) * mu_d) for xi in x]

    def phi(k: int, z):  # phi_k(z) = (e^z - sum_{j<k} z^j / j!) / z^k
        return (mp.exp(z) - sum(z**j / mp.factorial(j) for j in range(k))) / z**k

    sigmas = [mp.mpf(s) for s in GOLDEN_SIGMAS]
    x = [mp.mpf(v) for v in GOLDEN_NOISE]
    max_order = min(3, len(sigmas) - 2)
    outputs, levels, xs, denoised = [], [], [], []  # outputs/levels: the last max_order model outputs and sigmas
    for i, s in enumerate(sigmas[:-1]):
        if i == 0:
            m_s = posterior_mean(x, s)
        else:
            p = min(i, max_order)
            lam = lambda sigma: -mp.log(sigma)  # noqa: E731
            h = lam(s) - lam(levels[-1])
            z = -h
            B = z  # bh1: B(h) = h (in the data-prediction sign convention, -h)
            r = [(lam(levels[-(k + 1)]) - lam(levels[-1])) / h for k in range(1, p)] + [mp.mpf(1)]
            R = mp.matrix([[rk**row for rk in r] for row in range(p)])  # row k: r^k
            b = [mp.factorial(k) * z * phi(k + 1, z) / B for k in range(1, p + 1)]
            m0 = outputs[-1]
            D = [[(older - newest) / r[k] for older, newest in zip(outputs[-(k + 2)], m0)] for k in range(p - 1)]
            rho_p = ([] if p == 1 else [mp.mpf("0.5")] if p == 2
                     else list(mp.lu_solve(R[0:p - 1, 0:p - 1], mp.matrix(b[:-1]))))
            rho_c = [mp.mpf("0.5")] if p == 1 else list(mp.lu_solve(R, mp.matrix(b)))
            ddim = [mp.exp(z) * xj - mp.expm1(z) * mj for xj, mj in zip(x, m0)]  # the exponential integrator
            predicted = [d - B * sum(rho_p[k] * D[k][j] for k in range(p - 1)) for j, d in enumerate(ddim)]
            m_s = posterior_mean(predicted, s)
            x = [d - B * (sum(rho_c[k] * D[k][j] for k in range(p - 1)) + rho_c[-1] * (m_s[j] - m0[j]))
                 for j, d in enumerate(ddim)]
        outputs, levels = (outputs + [m_s])[-max_order:], (levels + [s])[-max_order:]
        xs.append([float(v) for v in x])
        denoised.append([float(v) for v in m_s])
    return xs, denoised


if __name__ == "__main__":
    golden_x, golden_denoised = golden_unipc_bh1()
    print("GOLDEN_UNIPC_X = (")
    for row in golden_x[1:]:
        print(f"    ({', '.join(repr(v) for v in row)}),")
    print(")\nGOLDEN_UNIPC_DENOISED = (")
    for row in golden_denoised:
        print(f"    ({', '.join(repr(v) for v in row)}),")
    print(")")
