// The time grids and guidance of jitfast.diffusion.sampling: the official grid's guidance weights
// and the exponential methods' grids with their coefficients
// (jitfast/diffusion/sampling/schedules.py, multistep.py), computed as Python computes them.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <vector>

namespace jitfast {

// w(t) for float32 times: cfg where t < hi and (lo == 0 or t > lo), else 1, compared as torch
// compares a float32 tensor with a Python float.
std::vector<double> guidance_weights(const at::Tensor& times, double cfg, double lo, double hi);

// One step of an exponential method: its start time t and c = max(1 - t, t_eps) (float32 as in
// Python), its guidance weight w, and its coefficients: e^(-Δλ) then the predictor's weights
// on x̂_n, x̂_(n-1), ... (pred), e^(-Δλ) then the corrector's on x̂_(n+1), x̂_n, ... (corr;
// empty when the step is not corrected).
struct MultistepStep {
  float t, c;
  double w;
  std::vector<double> pred, corr;
};

bool is_multistep(const std::string& method);

// The steps of jitfast.diffusion.sampling.MultistepTimeGrid.make(method, steps, schedule, ...)
// from t = 0 to 1; throws std::invalid_argument for an unknown method or schedule, too few steps
// for the method's order, or too few to put grid points on the guidance interval's ends.
std::vector<MultistepStep> multistep_grid(const std::string& method, const std::string& schedule,
                                          int64_t steps, double cfg, double lo, double hi,
                                          double t_eps);

}  // namespace jitfast
