#include "sampler.h"

#include "grids.h"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <fstream>
#include <stdexcept>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace jitfast {
namespace {

constexpr int kFormatVersion = 2;  // 1: a JiT package, from before the family key

std::string describe(at::IntArrayRef shape) {
  std::string text = "(";
  for (const auto size : shape) text += std::to_string(size) + ", ";
  if (!shape.empty()) text.resize(text.size() - 2);
  return text + ")";
}

std::string dtype_name(at::ScalarType type) {  // NumPy's names, as the .npy files say
  return type == at::kFloat ? "float32" : type == at::kByte ? "uint8" : c10::toString(type);
}

void check_sampling_args(const PackageSettings& s, const at::Tensor& labels,
                         const at::Tensor& z0, const SamplerOptions& o) {
  auto fail = [](const std::string& what) { throw std::invalid_argument(what); };
  if (labels.dim() != 1 || labels.scalar_type() != at::kLong)
    fail("labels must be a 1-D int64 tensor, got shape " + describe(labels.sizes()));
  if (labels.numel() == 0) fail("no labels given: nothing to sample");
  const int64_t low = labels.min().item<int64_t>(), high = labels.max().item<int64_t>();
  if (low < 0 || high > s.num_classes)
    fail("class labels must lie in [0, " + std::to_string(s.num_classes - 1) + "] (or " +
         std::to_string(s.num_classes) + ", the null class) for this package, got [" +
         std::to_string(low) + ", " + std::to_string(high) + "]");
  if (o.steps < 1) fail("steps must be >= 1, got " + std::to_string(o.steps));
  if (s.family == "pmf") {
    if (o.method != "pmf")
      fail("method '" + o.method + "' is for JiT packages: a pMF package samples with pMF's own "
           "update z <- z - (t - r) * u, one network pass per step (method pmf, its default)");
    if (o.schedule != "linear")
      fail("a pMF package samples on the linear grid from t = 1 to 0; the '" + o.schedule +
           "' schedule is for a JiT package's exponential methods");
    if (!(o.cfg >= 1))
      fail("omega (pMF's guidance scale, the cfg) must be >= 1 (1: no guidance), got " +
           std::to_string(o.cfg));
  } else {
    if (o.method != "heun" && o.method != "euler" && !is_multistep(o.method))
      fail("method must be one of heun, euler, ddim, dpm2m, dpm3m, unipc2, unipc3, got '" +
           o.method + "'");
    if (!is_multistep(o.method) && o.schedule != "linear")
      fail(o.method + " runs the official linear grid; the '" + o.schedule + "' schedule is "
           "for the exponential methods (ddim, dpm2m, dpm3m, unipc2, unipc3)");
    if (o.cfg < 0) fail("cfg must be >= 0, got " + std::to_string(o.cfg));
  }
  if (!(0.0 <= o.lo && o.lo <= o.hi && o.hi <= 1.0))
    fail("the interval must satisfy 0 <= lo <= hi <= 1, got (" + std::to_string(o.lo) + ", " +
         std::to_string(o.hi) + ")");
  const std::vector<int64_t> shape{labels.size(0), s.in_channels, s.input_size, s.input_size};
  if (!z0.sizes().equals(shape) || z0.scalar_type() != at::kFloat)
    fail("z0 must be float32 of shape " + describe(shape) + " (one " +
         std::to_string(s.in_channels) + "x" + std::to_string(s.input_size) + "x" +
         std::to_string(s.input_size) + " noise per label, as the package makes), got " +
         dtype_name(z0.scalar_type()) + " " + describe(z0.sizes()));
}

template <typename T>
T parse(const std::string& key, const std::string& text) {
  try {
    size_t used = 0;
    T value;
    if constexpr (std::is_integral<T>::value) value = std::stoll(text, &used);
    else value = std::stod(text, &used);
    if (used == text.size()) return value;
  } catch (const std::logic_error&) {
  }
  throw std::runtime_error("the package's metadata has a bad " + key + ": '" + text + "'");
}

}  // namespace

PackageSettings read_package_settings(const std::string& path) {
  if (!std::ifstream(path)) throw std::runtime_error("cannot open the package " + path);
  std::unordered_map<std::string, std::string> meta;
  try {
    meta = torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(path, "model");
  } catch (const c10::Error& err) {
    throw std::runtime_error(path + " is not a readable AOTInductor package (" +
                             err.what_without_backtrace() + "); export it again with python "
                             "-m jitfast.export");
  }
  auto get = [&](const std::string& key) {
    const auto found = meta.find("jitfast." + key);
    if (found == meta.end())
      throw std::runtime_error(path + " has no jitfast." + key + " in its metadata: it was not "
                               "made by python -m jitfast.export (or by an older version)");
    return found->second;
  };
  const auto format = parse<int64_t>("format", get("format"));
  if (format != kFormatVersion && format != 1)
    throw std::runtime_error(path + " has package format " + std::to_string(format) +
                             ", this jitfast-sample reads format " +
                             std::to_string(kFormatVersion) + " (and 1, of older JiT packages)"
                             ": export and build with the same jitfast version");
  auto number = [&](const std::string& key) { return parse<double>(key, get(key)); };
  auto integer = [&](const std::string& key) { return parse<int64_t>(key, get(key)); };
  PackageSettings s;
  s.family = format == 1 ? "jit" : get("family");
  s.input_size = integer("input_size");
  s.in_channels = integer("in_channels");
  s.num_classes = integer("num_classes");
  s.max_batch = integer("max_batch");
  s.noise_scale = number("noise_scale");
  s.device = get("device");
  s.dtype = get("dtype");
  if (s.family == "jit") {
    s.t_eps = number("t_eps");
    s.pred = get("pred");
    if (s.pred != "x" && s.pred != "e" && s.pred != "v")
      throw std::runtime_error(path + ": unknown prediction target '" + s.pred + "'");
  } else if (s.family == "pmf") {
    s.omega = number("omega");
    s.t_min = number("t_min");
    s.t_max = number("t_max");
  } else {
    throw std::runtime_error(path + ": unknown model family '" + s.family + "'");
  }
  if (s.dtype != "float32" && s.dtype != "bfloat16")
    throw std::runtime_error(path + ": unknown dtype '" + s.dtype + "'");
  if (s.device != "cpu" && s.device != "cuda")
    throw std::runtime_error(path + ": unknown device '" + s.device + "'");
  return s;
}

Sampler::Sampler(const std::string& package)
    : settings_(read_package_settings(package)),
      device_(settings_.device == "cuda" ? at::kCUDA : at::kCPU),
      dtype_(settings_.dtype == "bfloat16" ? at::kBFloat16 : at::kFloat) {
  if (device_.is_cuda() && !at::hasCUDA())
    throw std::runtime_error(package + " runs on CUDA, but this libtorch sees no CUDA device; "
                             "export with --device cpu for the CPU");
  try {
    loader_ = std::make_unique<torch::inductor::AOTIModelPackageLoader>(package);
  } catch (const c10::Error& err) {
    throw std::runtime_error("cannot load " + package + ": " + err.what_without_backtrace());
  }
}

SamplerOptions Sampler::default_options() const {
  SamplerOptions o;
  if (settings_.family == "pmf") {
    o.steps = 1;
    o.method = "pmf";
    o.cfg = settings_.omega;
    o.lo = settings_.t_min;
    o.hi = settings_.t_max;
  }
  return o;
}

at::Tensor Sampler::generate(const at::Tensor& labels, const at::Tensor& z0,
                             const SamplerOptions& options) {
  check_sampling_args(settings_, labels, z0, options);
  c10::InferenceMode inference;
  std::vector<at::Tensor> images;
  for (int64_t first = 0; first < labels.size(0); first += settings_.max_batch) {
    const int64_t count = std::min(settings_.max_batch, labels.size(0) - first);
    images.push_back(generate_batch(labels.narrow(0, first, count), z0.narrow(0, first, count),
                                    options));
  }
  return at::cat(images);
}

// jitfast.diffusion.sampling.generate (PMFSampler.generate) for one batch, op for op (each scalar enters
// as torch's does).
at::Tensor Sampler::generate_batch(const at::Tensor& labels, const at::Tensor& z0,
                                   const SamplerOptions& o) {
  const auto y = labels.to(device_);
  auto z = settings_.noise_scale * z0.to(device_, at::kFloat);
  if (settings_.family == "pmf") return integrate_pmf(y, z, o).cpu();
  if (is_multistep(o.method)) return integrate_multistep(y, z, o).cpu();
  const auto timesteps = at::linspace(0.0, 1.0, o.steps + 1, at::kFloat);
  const auto w = guidance_weights(timesteps, o.cfg, o.lo, o.hi);
  const auto times = timesteps.to(at::kDouble);
  const auto t = times.accessor<double, 1>();
  for (int64_t i = 0; i < o.steps; ++i) {
    const double dt = (timesteps[i + 1] - timesteps[i]).item<double>();
    const auto v = velocity(z, y, t[i], w[i]);
    auto z_next = z + dt * v;
    if (o.method == "heun" && i < o.steps - 1) {  // the last step is always Euler
      const auto v_next = velocity(z_next, y, t[i + 1], w[i + 1]);
      z_next = z + dt * (0.5 * (v + v_next));
    }
    z = z_next;
  }
  return z.cpu();
}

// jitfast.diffusion.sampling.multistep.integrate_multistep: x̂ = z + c·v at each step's start, the
// previous step redone with it when corrected, then the predictor's step.
at::Tensor Sampler::integrate_multistep(const at::Tensor& y, at::Tensor z,
                                        const SamplerOptions& o) {
  const auto grid = multistep_grid(o.method, o.schedule, o.steps, o.cfg, o.lo, o.hi,
                                   settings_.t_eps);
  auto combine = [](const std::vector<double>& coef, const at::Tensor& state,
                    const std::vector<at::Tensor>& predictions) {
    auto out = coef[0] * state;
    for (size_t i = 1; i < coef.size(); ++i) out = out + coef[i] * predictions[i - 1];
    return out;
  };
  std::vector<at::Tensor> history;  // x̂ newest first
  at::Tensor start = z;
  for (size_t n = 0; n < grid.size(); ++n) {
    const auto& step = grid[n];
    const auto x = z + step.c * velocity(z, y, step.t, step.w);
    history.insert(history.begin(), x);
    if (n > 0 && !grid[n - 1].corr.empty()) z = combine(grid[n - 1].corr, start, history);
    if (history.size() > 4) history.pop_back();
    start = z;
    z = combine(step.pred, z, history);
  }
  return z;
}

// jitfast.diffusion.pmf_sampler.integrate_pmf: z <- z - h * u(z, t, h, omega, t_min, t_max, y)
// on pMF's grid t = linspace(1, 0, steps + 1) (float32), h = t_i - t_(i+1); guidance is the
// network's input (cfg: omega, [lo, hi]: [t_min, t_max]), one pass per step.
at::Tensor Sampler::integrate_pmf(const at::Tensor& y, at::Tensor z, const SamplerOptions& o) {
  const auto grid = at::linspace(1.0, 0.0, o.steps + 1, at::kFloat);
  const auto h = grid.narrow(0, 0, o.steps) - grid.narrow(0, 1, o.steps);
  const auto times = grid.to(at::kDouble), steps = h.to(at::kDouble);  // float32 values, exact
  const auto t = times.accessor<double, 1>(), dt = steps.accessor<double, 1>();
  auto batch_of = [&](double value) {
    return at::full({z.size(0)}, value, at::TensorOptions(at::kFloat).device(device_));
  };
  const auto omega = batch_of(o.cfg), t_min = batch_of(o.lo), t_max = batch_of(o.hi);
  for (int64_t i = 0; i < o.steps; ++i) {
    const auto u = loader_->run({z.to(dtype_), batch_of(t[i]), batch_of(dt[i]), omega, t_min,
                                 t_max, y})[0].to(at::kFloat);
    z = z - dt[i] * u;
  }
  return z;
}

// network_velocity: one conditional pass, or (where w != 1) cond and uncond as one batch.
at::Tensor Sampler::velocity(const at::Tensor& z, const at::Tensor& y, double t, double w) {
  const bool guided = w != 1.0;
  auto z_in = guided ? at::cat({z, z}) : z;
  auto y_in = guided ? at::cat({y, at::full_like(y, settings_.num_classes)}) : y;
  auto t_in = at::full({z_in.size(0)}, t, at::TensorOptions(at::kFloat).device(device_));
  const auto out = loader_->run({z_in.to(dtype_), t_in, y_in})[0].to(at::kFloat);
  const auto t_b = at::full({z.size(0), 1, 1, 1}, t, at::TensorOptions(at::kFloat).device(device_));
  if (!guided) return to_velocity(out, z, t_b);
  const auto halves = out.chunk(2);
  const auto v_cond = to_velocity(halves[0], z, t_b), v_uncond = to_velocity(halves[1], z, t_b);
  return v_uncond + w * (v_cond - v_uncond);
}

// jitfast.diffusion.convert(out, pred, "v", z, t, t_eps), divisions clamped at t_eps.
at::Tensor Sampler::to_velocity(const at::Tensor& out, const at::Tensor& z,
                                const at::Tensor& t) const {
  if (settings_.pred == "x") return (out - z) / (1 - t).clamp_min(settings_.t_eps);
  if (settings_.pred == "e") return (z - out) / t.clamp_min(settings_.t_eps);
  return out;
}

}  // namespace jitfast
