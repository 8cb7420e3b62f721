"""The sampling ODE's update math, below both the sampler and the kernels that fuse it.

The official ODE is dz/dt = (x̂ - z)/c(t), c(t) = max(1 - t, t_eps). In the time
λ(t) = ∫ dt / c(t) it reads dz/dλ = x̂ - z, so with x̂ a polynomial in λ through earlier
predictions the step is an exact integral against e^(-Δλ): the exponential integrators
(order 1 is JiT's DDIM step z' = x̂ + (z - x̂)·e^(-Δλ)).
"""
import math

import numpy as np


def ode_update(v, z, dt, v_prev=None, base=None):
    """(state, v) after evaluating the velocity v at state z: the Euler step z + dt·v; or for
    Heun's second evaluation, at z = base + dt·v_prev, the step base + dt·(v_prev + v)/2 (whose v
    nothing needs: the fused kernel leaves it empty)."""
    if v_prev is None:
        return z + dt * v, v
    return base + dt * (0.5 * (v_prev + v)), v


def ode_time(t, t_eps):
    """λ(t) = ∫_0^t ds / max(1 - s, t_eps): -ln(1 - t) while 1 - t >= t_eps, then linear at
    rate 1/t_eps (finite at t = 1: 1 - ln t_eps)."""
    if 1.0 - t >= t_eps:
        return -math.log1p(-t)
    return -math.log(t_eps) + (t - (1.0 - t_eps)) / t_eps


def exponential_weights(h, nodes):
    """The weights b_i of z' = e^(-h)·z + Σ b_i·x̂_i: the exact integral over [0, h] of
    e^(-(h - u))·p(u), p the polynomial through (nodes[i], x̂_i) (nodes in λ, relative to the
    step's start; h may be negative, for integrating backwards)."""
    # φ_j = ∫_0^h e^(-(h-u)) u^j du, by parts: φ_0 = 1 - e^(-h), φ_j = h^j - j·φ_(j-1)
    phi = [-math.expm1(-h)]
    for j in range(1, len(nodes)):
        phi.append(h ** j - j * phi[-1])
    weights = []
    for i, node in enumerate(nodes):
        others = [u for k, u in enumerate(nodes) if k != i]
        basis = np.polynomial.polynomial.polyfromroots(others) / np.prod([node - u for u in others])
        weights.append(float(np.dot(basis, phi)))
    return weights
