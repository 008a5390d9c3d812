"""Improved DDPM (learned variance: loss and respaced sampling) and SUPIR's restoration-guided EDM sampler against
numbers of the official code.

How the fixtures were made (numbers only, no official code in this repository):

- ``tests/fixtures/iddpm_official.npz``: ``PixArt-alpha/PixArt-alpha`` @ cac2fd3 (``diffusion/iddpm.py`` and
  ``diffusion/model/{gaussian_diffusion,respace,diffusion_utils}.py``, the same maths as DreamClear's copy) run
  on CPU in a scratch environment: ``IDDPM("1000").training_losses`` for seeded ``x_0``, noise, t = [0, 1, 500,
  999] and a model returning a fixed ``[eps, v]`` (four v tensors: 0, U[-1, 1], -1, +1); ``IDDPM("50")
  .p_sample_loop`` (``clip_denoised=False``) from a seeded ``x_T`` with the model ``cat([0.8 x + 0.1 t / 1000,
  tanh(x)])`` and the per-step noise injected from a stored list. ``f32``: the code as released (coefficients
  rounded to float32); ``f64``: the same with float64 coefficients.
- ``tests/fixtures/edm_official.npz``: ``Fanghua-Yu/SUPIR`` @ bda91af (``sgm/modules/diffusionmodules/
  {sampling,discretizer,guiders,denoiser,denoiser_scaling}.py``) with ``test.py``'s settings (50 steps,
  s_churn 5, s_noise 1.01, CFG 4.0 ramped linearly from 1.0 at sigma_max, control scale 1), restoration
  guidance off (tau = -1, the CLI default) and on (tau = 4, the paper), and the tiled sampler (tile 16, stride 8)
  on a 24 x 16 latent; the fake network ``eps = 0.5 tanh(x_in) + 0.001 t + m (0.1 + 0.05 control)`` (m = +1 for
  the conditional, -1 for the unconditional row), all random draws taken from stored lists.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from restore.diffusion.edm import DiscreteSigmas
from restore.diffusion.iddpm import LearnedRangeSchedule, betas_from_config, space_timesteps
from restore.models.priors import sd_scheduler_config, tiny_prior
from restore.models.priors.pixart import pixart_scheduler_config
from restore.sampling import steppers
from restore.sampling.sampler import SamplingInputs, SamplingSettings, sample

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def iddpm() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "iddpm_official.npz") as data:
        return dict(data)


@pytest.fixture(scope="module")
def edm() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "edm_official.npz") as data:
        return dict(data)


def _t(array: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)


# ------------------------------------------------------------------------------------------------ iDDPM
def test_respacing_and_schedule_equal_pixarts(iddpm) -> None:
    full = LearnedRangeSchedule.from_config(pixart_scheduler_config())
    np.testing.assert_array_equal(full.alphas_cumprod.numpy(), iddpm["alphas_cumprod_1000"])
    kept = space_timesteps(1000, "50")
    assert kept[:4] == [0, 20, 41, 61] and kept[-2:] == [979, 999]
    np.testing.assert_array_equal(kept, iddpm["timestep_map_50"])
    chain = full.respaced(kept)
    for name in ("betas", "alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped"):
        np.testing.assert_array_equal(getattr(chain, name).numpy(), iddpm[f"r50_{name}"], err_msg=name)
    for name in ("posterior_mean_coef1", "posterior_mean_coef2"):
        np.testing.assert_array_equal(getattr(chain, name).numpy(), iddpm[f"r50_{name}"], err_msg=name)
    # the other section forms of the official respacing
    assert space_timesteps(10, "3,2") == [0, 2, 4, 5, 9]
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))


@pytest.mark.parametrize("mode", ["f32", "f64"])
@pytest.mark.parametrize("v", ["v0", "vrand", "vm1", "vp1"])
def test_learned_variance_loss_terms_equal_the_official_training_losses(iddpm, mode, v) -> None:
    dtype = torch.float32 if mode == "f32" else torch.float64
    full = LearnedRangeSchedule.from_config(pixart_scheduler_config())
    t = torch.from_numpy(iddpm["train_t"])
    x0, noise, eps = (_t(iddpm[k], dtype) for k in ("train_x_start", "train_noise", "train_eps_pred"))
    x_t = full.q_sample(x0, t, noise)
    vb = full.vlb_bits(torch.cat([eps, _t(iddpm[f"train_v_{v}"], dtype)], dim=1), x0, x_t, t)
    mse = ((noise - eps) ** 2).mean(dim=(1, 2, 3))
    # the released float32 code is reproduced bit for bit; float64 to its summation order
    tol = {"rtol": 0, "atol": 0} if mode == "f32" else {"rtol": 1e-10, "atol": 1e-12}
    np.testing.assert_allclose(vb.numpy(), iddpm[f"train_{mode}_{v}_vb"], **tol)
    np.testing.assert_allclose(mse.numpy(), iddpm[f"train_{mode}_{v}_mse"], **tol)
    np.testing.assert_allclose((mse + vb).numpy(), iddpm[f"train_{mode}_{v}_loss"], **tol)


def test_objective_trains_the_variance_through_the_bound_only() -> None:
    from diffusers import DDPMScheduler

    from restore.methods.objectives import DiffusionObjective

    objective = DiffusionObjective(DDPMScheduler(**pixart_scheduler_config()), "epsilon", "learned_range")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([0, 700])
    x_t = objective.add_noise(x0, noise, t)
    output = torch.randn(2, 8, 8, 8, generator=g, requires_grad=True)
    terms = objective.losses(output, x0, x_t, noise, t)
    assert set(terms) == {"diffusion", "vlb"}
    (grad_vlb,) = torch.autograd.grad(terms["vlb"], output, retain_graph=True)
    (grad_mse,) = torch.autograd.grad(terms["diffusion"], output)
    assert not grad_vlb[:, :4].any() and grad_vlb[:, 4:].any()  # the mean is detached in the bound
    assert grad_mse[:, :4].any() and not grad_mse[:, 4:].any()
    with pytest.raises(ValueError, match="2 x 4 output channels"):
        objective.losses(output[:, :4], x0, x_t, noise, t)


@pytest.mark.parametrize("mode", ["f32", "f64"])
def test_iddpm_stepper_reproduces_the_official_respaced_chain(iddpm, mode, monkeypatch) -> None:
    dtype = torch.float32 if mode == "f32" else torch.float64
    settings = SamplingSettings(scheduler="iddpm", num_steps=50, start="noise", progress=False)
    stepper = steppers.build_stepper(settings, pixart_scheduler_config())
    noise = [_t(n, dtype) for n in iddpm["sample_noise"]]
    x = _t(iddpm["sample_x_T"], dtype)
    seen, trajectory = [], []
    for i in range(stepper.num_steps):
        model_input, t = stepper.model_input(x, i, None)
        seen.append(int(t))
        output = torch.cat([0.8 * model_input + 0.1 * (t.to(dtype) / 1000), torch.tanh(model_input)], dim=1)
        monkeypatch.setattr(steppers, "_randn", lambda *a, n=noise[i]: n)  # the official draw of this step
        x = stepper.step(output, i, x, None)
        trajectory.append(x)
    assert seen == iddpm[f"sample_{mode}_model_timesteps"][:, 0].tolist()  # the original timesteps
    # the model's t / 1000 rounds differently from the official int tensor: 1 ulp of float32 at most
    tol = {"rtol": 0, "atol": 1e-6} if mode == "f32" else {"rtol": 0, "atol": 1e-12}
    for index, expected in zip((1, 25, 49), iddpm[f"sample_{mode}_traj_steps_1_25_49"], strict=True):
        np.testing.assert_allclose(trajectory[index - 1].numpy(), expected, **tol)
    np.testing.assert_allclose(x.numpy(), iddpm[f"sample_{mode}_final"], **tol)


# ------------------------------------------------------------------------------------------------ EDM (SUPIR)
def _supir_settings(tau: float, tile: int = 96, overlap: int = 4) -> SamplingSettings:
    return SamplingSettings(
        scheduler="edm",
        num_steps=50,
        start="noise",
        s_churn=5.0,
        s_noise=1.01,
        guidance_scale=4.0,
        guidance_scale_start=1.0,
        restoration_guidance=tau,
        color_fix="none",
        latent_tile=tile,
        latent_tile_overlap=overlap,
        progress=False,
    )


def _fake_supir_network(latents, t, condition, spatial):
    """The fixture's fake network on our Denoiser interface (rows [uncond, cond] under CFG)."""
    m = condition.view(-1, 1, 1, 1)
    return 0.5 * torch.tanh(latents) + 0.001 * t.float() + m * (0.1 + 0.05 * spatial["control"])


def _run_supir(edm, prefix: str, tau: float, monkeypatch, tile: int = 96, overlap: int = 4) -> torch.Tensor:
    draws = [_t(edm[f"{prefix}x0_randn"]), *(_t(n) for n in edm[f"{prefix}churn_noise"])]
    monkeypatch.setattr(steppers, "_randn", lambda *a: draws.pop(0))
    control = _t(edm[f"{prefix}control"])
    h, w = control.shape[-2:]
    inputs = SamplingInputs(
        cond=torch.tensor([1.0]),
        uncond=torch.tensor([-1.0]),
        spatial={"control": control},
        guidance_reference=_t(edm[f"{prefix}x_center"]),
        decode=lambda latents: latents,  # compare the latents themselves
        image_size=(8 * h, 8 * w),
        batch_size=1,
    )
    vae = tiny_prior().vae
    out = sample(_fake_supir_network, inputs, vae, sd_scheduler_config(), _supir_settings(tau, tile, overlap))
    assert not draws  # one start draw and one churn draw per step, as the official sampler
    return out


def test_edm_sigmas_and_network_timesteps_equal_supirs(edm) -> None:
    discrete = DiscreteSigmas(torch.cumprod(1 - betas_from_config(sd_scheduler_config()), dim=0))
    np.testing.assert_array_equal(discrete.sigmas.numpy(), edm["denoiser_sigmas_1000"])
    sigmas, timesteps = discrete.chain(50)
    np.testing.assert_array_equal(sigmas.numpy(), edm["sigmas"])
    assert sigmas[0].item() == pytest.approx(14.614641, rel=1e-6) and sigmas[-2].item() == pytest.approx(
        0.134451, rel=1e-5
    )
    assert timesteps[:2].tolist() == [999, 979] and timesteps[-1].item() == 19
    stepper = steppers.build_stepper(
        _supir_settings(4.0), sd_scheduler_config(), guidance_reference=torch.zeros(1)
    )
    assert stepper.gamma == pytest.approx(0.1)  # min(5 / 50, sqrt(2) - 1)
    x = torch.zeros(1, 4, 8, 8)
    for i in (0, 1, 49):
        _, index = stepper.model_input(x, i, None)
        assert int(index) == edm["t_index"][i]  # the churned sigma snapped to the grid: 999, 995, ... 23
        assert stepper.guidance_scale(i, 4.0) == pytest.approx(float(edm["cfg_scale"][i]), rel=1e-6)
        stepper._state = None


@pytest.mark.parametrize(("tau", "key"), [(-1.0, "off_out"), (4.0, "tau4_out")])
def test_edm_stepper_reproduces_supirs_restoration_guided_sampler(edm, tau, key, monkeypatch) -> None:
    out = _run_supir(edm, "", tau, monkeypatch)
    # SUPIR applies CFG to the denoised x0, we to epsilon (the same affine map): float rounding apart
    np.testing.assert_allclose(out.numpy(), edm[key], rtol=2e-5, atol=2e-4)


@pytest.mark.parametrize(("tau", "key"), [(-1.0, "tiled_off_out"), (4.0, "tiled_tau4_out")])
def test_edm_with_latent_tiles_reproduces_supirs_tiled_sampler(edm, tau, key, monkeypatch) -> None:
    """SUPIR blends the stepped tiles (x_{t-1}) sharing one churn noise field; blending the network output before
    the (linear) step is the same map."""
    assert edm["tiled_windows"].tolist() == [[0, 16, 0, 16], [8, 24, 0, 16]]
    out = _run_supir(edm, "tiled_", tau, monkeypatch, tile=16, overlap=8)
    np.testing.assert_allclose(out.numpy(), edm[key], rtol=2e-5, atol=2e-4)


def test_edm_only_options_are_refused_elsewhere() -> None:
    with pytest.raises(ValueError, match="belong to scheduler=edm"):
        steppers.build_stepper(SamplingSettings(s_churn=5.0), sd_scheduler_config())
    with pytest.raises(ValueError, match="guidance reference latent"):
        steppers.build_stepper(_supir_settings(4.0), sd_scheduler_config())
    with pytest.raises(ValueError, match="lr_double"):
        SamplingSettings(scheduler="iddpm", start="lr_double", second_timestep=800)
