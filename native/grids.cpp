#include "grids.h"

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <set>
#include <stdexcept>
#include <utility>

namespace jitfast {
namespace {

// method -> (points of the predictor's polynomial, of the corrector's; 0: no corrector)
const std::map<std::string, std::pair<int64_t, int64_t>> kMethods = {
    {"ddim", {1, 0}}, {"dpm2m", {2, 0}}, {"dpm3m", {3, 0}}, {"unipc2", {2, 3}}, {"unipc3", {3, 4}}};

// jitfast.functional.ode.ode_time: λ(t) = ∫ dt / max(1 - t, t_eps)
double ode_time(double t, double t_eps) {
  if (1.0 - t >= t_eps) return -std::log1p(-t);
  return -std::log(t_eps) + (t - (1.0 - t_eps)) / t_eps;
}

// jitfast.functional.ode.exponential_weights: ∫_0^h e^(-(h-u)) ℓ_i(u) du for the Lagrange basis ℓ_i of
// the nodes, through φ_j = ∫_0^h e^(-(h-u)) u^j du.
std::vector<double> exponential_weights(double h, const std::vector<double>& nodes) {
  const size_t k = nodes.size();
  std::vector<double> phi{-std::expm1(-h)};
  for (size_t j = 1; j < k; ++j) phi.push_back(std::pow(h, j) - j * phi.back());
  std::vector<double> weights;
  for (size_t i = 0; i < k; ++i) {
    std::vector<double> basis{1.0};  // ∏_(m≠i) (u - u_m), lowest degree first
    double scale = 1.0;
    for (size_t m = 0; m < k; ++m) {
      if (m == i) continue;
      std::vector<double> next(basis.size() + 1, 0.0);
      for (size_t j = 0; j < basis.size(); ++j) {
        next[j] -= nodes[m] * basis[j];
        next[j + 1] += basis[j];
      }
      basis = next;
      scale *= nodes[i] - nodes[m];
    }
    double weight = 0.0;
    for (size_t j = 0; j < k; ++j) weight += basis[j] * phi[j];
    weights.push_back(weight / scale);
  }
  return weights;
}

// jitfast.diffusion.sampling.schedules.schedule_times: float32, the point nearest each jump moved onto it
std::vector<float> schedule_times(const std::string& schedule, int64_t steps, double cfg,
                                  double lo, double hi, double t_eps) {
  std::vector<float> t(steps + 1);
  const double top = ode_time(1.0, t_eps), knee = -std::log(t_eps);
  for (int64_t i = 0; i <= steps; ++i) {
    const double u = static_cast<double>(i) / steps;
    if (schedule == "linear") {
      t[i] = static_cast<float>(u);
    } else if (schedule == "cosine") {
      t[i] = static_cast<float>(std::pow(std::sin(0.5 * std::acos(-1.0) * u), 2));
    } else if (schedule == "lambda") {
      const double lam = top * u;
      t[i] = static_cast<float>(lam <= knee ? -std::expm1(-lam)
                                            : 1.0 - t_eps + (lam - knee) * t_eps);
    } else {
      throw std::invalid_argument("schedule must be linear, cosine or lambda, got '" + schedule +
                                  "'" +
                                  (schedule == "quantile" ? " (quantile needs the training "
                                   "distribution of t, which the package does not record)" : ""));
    }
  }
  t[0] = 0.0f;
  t[steps] = 1.0f;
  std::set<int64_t> taken;
  for (const double jump : {lo, hi}) {
    if (cfg == 1.0 || lo >= hi || !(0.0 < jump && jump < 1.0)) continue;
    if (steps < 2)
      throw std::invalid_argument("guidance on an interval needs a grid point on each end "
                                  "inside (0, 1): use at least 2 steps (3 when both ends are)");
    int64_t nearest = 1;
    for (int64_t k = 2; k < steps; ++k)
      if (std::abs(t[k] - static_cast<float>(jump)) <
          std::abs(t[nearest] - static_cast<float>(jump)))
        nearest = k;
    if (!taken.insert(nearest).second)
      throw std::invalid_argument(std::to_string(steps) + " steps are too few to put a grid "
                                  "point on both ends of the guidance interval: use more steps");
    t[nearest] = static_cast<float>(jump);
  }
  return t;
}

}  // namespace

std::vector<double> guidance_weights(const at::Tensor& times, double cfg, double lo, double hi) {
  auto inside = times < hi;
  if (lo != 0) inside = inside & (times > lo);
  const auto weights = at::where(inside, at::scalar_tensor(cfg, at::kFloat),
                                 at::scalar_tensor(1.0, at::kFloat)).to(at::kDouble);
  return std::vector<double>(weights.data_ptr<double>(),
                             weights.data_ptr<double>() + weights.numel());
}

bool is_multistep(const std::string& method) { return kMethods.count(method) > 0; }

std::vector<MultistepStep> multistep_grid(const std::string& method, const std::string& schedule,
                                          int64_t steps, double cfg, double lo, double hi,
                                          double t_eps) {
  const auto [P, C] = kMethods.at(method);
  if (steps < P)
    throw std::invalid_argument(method + " is a " + std::to_string(P) + "-step method: it needs "
                                "steps >= " + std::to_string(P));
  const auto t = schedule_times(schedule, steps, cfg, lo, hi, t_eps);
  // each step's guidance, at its midpoint (schedules.step_guidance)
  auto mid = at::empty({steps}, at::kFloat);
  for (int64_t n = 0; n < steps; ++n)
    mid[n] = static_cast<float>(0.5 * (static_cast<double>(t[n + 1]) + t[n]));
  const auto w = guidance_weights(mid, cfg, lo, hi);
  std::vector<double> lam;
  for (const float time : t) lam.push_back(ode_time(time, t_eps));
  std::vector<MultistepStep> grid;
  int64_t segment = 0;
  for (int64_t n = 0; n < steps; ++n) {
    if (n > 0 && w[n] != w[n - 1]) segment = n;  // no history across a jump of w
    const bool next_same = n + 1 < steps && w[n + 1] == w[n];
    const int64_t k = std::min(P, n - segment + 1);
    const int64_t m = C && next_same ? std::min(C, n - segment + 2) : 0;
    const double h = lam[n + 1] - lam[n];
    std::vector<double> pred_nodes, corr_nodes;
    for (int64_t i = 0; i < k; ++i) pred_nodes.push_back(lam[n - i] - lam[n]);
    for (int64_t i = 0; i < m; ++i) corr_nodes.push_back(lam[n + 1 - i] - lam[n]);
    MultistepStep step{t[n], std::max(1.0f - t[n], static_cast<float>(t_eps)), w[n], {}, {}};
    step.pred.push_back(std::exp(-h));
    for (const double b : exponential_weights(h, pred_nodes)) step.pred.push_back(b);
    if (m) {
      step.corr.push_back(std::exp(-h));
      for (const double b : exponential_weights(h, corr_nodes)) step.corr.push_back(b);
    }
    grid.push_back(step);
  }
  return grid;
}

}  // namespace jitfast
