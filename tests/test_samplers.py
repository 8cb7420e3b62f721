"""The exponential-integrator samplers against exact answers: Gaussian data (the optimal
denoiser, the flow in closed form, the clamped ODE integrated finely), a constant x-prediction
(where every method must be exact, guidance jumps included), inversion, and bad input."""
import math

import pytest
import torch
import torch.nn as nn

from jitfast import Denoiser
from jitfast.diffusion.sampling import EXPONENTIAL_METHODS, SCHEDULES, MultistepTimeGrid
from jitfast.experiments.gaussian import gaussian_denoiser, reference_images
from jitfast.functional.ode import ode_time

Y = torch.tensor([0, 1, 2, 1])
Z0 = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def gaussian():
    denoiser = gaussian_denoiser()
    return denoiser, reference_images(denoiser, Y, Z0, steps_per_piece=500)


def test_reference_is_the_closed_form_flow_before_the_clamp(gaussian):
    denoiser, _ = gaussian
    t = 1 - denoiser.t_eps
    assert rel_err(reference_images(denoiser, Y, Z0, steps_per_piece=500, end=t),
                   denoiser.net.flow(Z0, t, Y)) < 1e-9


# observed order between 20 and 40 and between 40 and 80 steps on the linear grid: at least
ORDERS = {"ddim": 0.9, "dpm2m": 1.8, "dpm3m": 2.8, "unipc2": 2.3, "unipc3": 3.3}


@pytest.mark.parametrize("method", ORDERS)
def test_observed_order_on_gaussian_data(gaussian, method):
    """Also, for the higher orders: the clamped ODE is the one solved (the unclamped flow's end
    is 5x farther than the 80-step error), and the error falls below Heun's at half the
    evaluations."""
    denoiser, reference = gaussian
    errors = [rel_err(denoiser.generate(Y, n, method, z0=Z0), reference) for n in (20, 40, 80)]
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert min(orders) >= ORDERS[method], (errors, orders)
    if method != "ddim":
        assert rel_err(denoiser.net.flow(Z0, 1.0, Y), reference) > 5 * errors[-1]
        assert errors[-1] < rel_err(denoiser.generate(Y, 40, "heun", z0=Z0), reference)


def test_guided_gaussian_converges_to_the_guided_ode(gaussian):
    denoiser, _ = gaussian
    reference = reference_images(denoiser, Y, Z0, 3.0, (0.1, 1.0), steps_per_piece=500)
    errors = [rel_err(denoiser.generate(Y, n, "unipc2", 3.0, (0.1, 1.0), z0=Z0), reference)
              for n in (20, 40, 80)]
    assert errors[2] < errors[1] / 4 < errors[0] / 12, errors


class ConstantPrediction(nn.Module):
    """x̂ = images[y] whatever z and t (the last row answers the null class)."""

    def __init__(self, images):
        super().__init__()
        self.images, self.num_classes = images, images.shape[0] - 1
        self.in_channels, self.input_size = images.shape[1], images.shape[-1]
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, z, t, y):
        return self.images[y]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("method", EXPONENTIAL_METHODS)
def test_exact_for_a_piecewise_constant_prediction(method, schedule):
    """With x̂ constant between the guidance interval's ends (conditional outside, guided
    inside), the clamped ODE's answer is
    z ← x̂ + (z - x̂)·e^(-Δλ) per piece: every method gives it exactly, which it cannot if a
    multistep history mixes the guided and unguided x̂, or a step straddles a jump."""
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    denoiser = Denoiser(ConstantPrediction(images), noise_scale=1.5, t_eps=0.05)
    y, cfg, (lo, hi) = torch.tensor([0, 2]), 2.5, (0.3, 0.7)
    guided = images[3] + cfg * (images[y] - images[3])
    z = 1.5 * Z0[:2]
    for a, b, x in ((0, lo, images[y]), (lo, hi, guided), (hi, 1, images[y])):
        z = x + (z - x) * math.exp(-(ode_time(b, 0.05) - ode_time(a, 0.05)))
    out = denoiser.generate(y, 9, method, cfg, (lo, hi), z0=Z0[:2], schedule=schedule)
    assert rel_err(out, z) < 1e-5


def test_time_grid_has_points_on_the_jumps_and_no_history_across_them():
    denoiser = gaussian_denoiser()
    time_grid = MultistepTimeGrid.make("unipc3", 7, "linear", 3.0, (0.1, 0.55), denoiser, "cpu")
    t = time_grid.t.tolist()
    assert t[0] == 0 and t[-1] == 1 and all(a < b for a, b in zip(t, t[1:]))
    first, last = (t.index(torch.tensor(end).item()) for end in (0.1, 0.55))  # 1/7, 4/7 moved
    assert (first, last) == (1, 4)
    assert time_grid.guided == (False, True, True, True, False, False, False)
    assert time_grid.predictor == (1, 1, 2, 3, 1, 2, 3)
    assert time_grid.corrector == (0, 2, 3, 0, 2, 3, 0)


@pytest.mark.parametrize("method, steps, bound", [("heun", 50, 0.1), ("unipc2", 20, 0.01),
                                                  ("dpm2m", 40, 0.01)])
def test_inversion_round_trip_on_gaussian_data(method, steps, bound):
    denoiser = gaussian_denoiser()
    schedule = "linear" if method == "heun" else "lambda"

    def round_trip(n):
        images = denoiser.generate(Y, n, method, 3.0, (0.1, 1.0), z0=Z0, schedule=schedule)
        return rel_err(denoiser.invert(images, Y, n, method, 3.0, (0.1, 1.0), schedule), Z0)
    assert round_trip(steps) < bound < round_trip(steps // 2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="rk4"), r"method must be one of \('heun', 'euler', 'ddim', 'dpm2m'"),
    (dict(method="dpm2m", schedule="karras"),
     r"schedule must be one of \('linear', 'cosine', 'lambda'"),
    (dict(method="dpm3m", steps=2), "dpm3m is a 3-step method: it needs steps >= 3, got 2"),
    (dict(method="heun", schedule="lambda"), "heun runs the official linear grid"),
    (dict(method="ddim", steps=3, cfg=2.0, interval=(0.4, 0.5)),
     r"3 steps are too few to put a grid point on both ends of the guidance interval"),
    (dict(method="ddim", steps=1, cfg=2.0, interval=(0.4, 1.0)), "use at least 2 steps"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        gaussian_denoiser().generate(Y, **{"steps": 10, **kwargs})


def test_invert_checks_the_images_shape():
    with pytest.raises(ValueError, match=r"images must have shape \(4, 3, 8, 8\)"):
        gaussian_denoiser().invert(torch.zeros(4, 3, 4, 4), Y, 10, "ddim")
