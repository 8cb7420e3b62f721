// The samplers of jitfast on a network exported by `python -m jitfast.export`: for a JiT, those
// of jitfast.diffusion.sampling (the same grid, guidance, solvers and float32 state, op for op); for a
// pixel MeanFlow (pMF) network, PMFSampler's update. The images equal Python's up to the
// network's own rounding.
#pragma once

#include <ATen/core/Tensor.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <cstdint>
#include <memory>
#include <string>

namespace jitfast {

// What jitfast.export wrote into the package's metadata (format 2; format 1: a JiT package,
// from before the family was recorded).
struct PackageSettings {
  std::string family;  // "jit" or "pmf"
  int64_t input_size, in_channels, num_classes, max_batch;
  double noise_scale;
  double t_eps = 0;                        // JiT only
  std::string pred;                        // JiT only: network output "x", "e" or "v"
  double omega = 1, t_min = 0, t_max = 1;  // pMF only: its default guidance
  std::string device;                      // "cpu" or "cuda"
  std::string dtype;                       // "float32" or "bfloat16"
};

// The settings of the package at `path`; throws std::runtime_error when it cannot be read, is
// not a jitfast export, or has a format version this program does not read.
PackageSettings read_package_settings(const std::string& path);

// A JiT package's defaults; Sampler::default_options gives a package's own.
struct SamplerOptions {
  int64_t steps = 50;
  std::string method = "heun";  // Heun with a last Euler step, "euler", or an exponential
                                // method: ddim, dpm2m, dpm3m, unipc2, unipc3; "pmf" (pMF's
                                // update, the only one of a pMF package)
  std::string schedule = "linear";  // the exponential methods' grid: linear, cosine or lambda
  double cfg = 1.0;           // pMF: omega, >= 1
  double lo = 0.0, hi = 1.0;  // guidance where t < hi and (lo == 0 or t > lo); pMF: the
                              // network's interval input [t_min, t_max]
};

class Sampler {
 public:
  explicit Sampler(const std::string& package);

  const PackageSettings& settings() const { return settings_; }

  // The package's defaults: a JiT's are SamplerOptions{}; a pMF package's 1 step of method
  // "pmf" with the omega (as cfg) and interval it was exported with.
  SamplerOptions default_options() const;

  // jitfast.diffusion.sampling.generate (a JiT) or PMFSampler.generate (pMF): float32 images
  // (B, C, H, W) on the CPU for int64 labels (B,) in [0, num_classes] (the last is the null
  // class) and a standard-normal start z0 (B, C, H, W), run at most max_batch images at a
  // time. Throws std::invalid_argument for bad input.
  at::Tensor generate(const at::Tensor& labels, const at::Tensor& z0,
                      const SamplerOptions& options);

 private:
  at::Tensor generate_batch(const at::Tensor& labels, const at::Tensor& z0,
                            const SamplerOptions& options);
  at::Tensor integrate_multistep(const at::Tensor& y, at::Tensor z, const SamplerOptions& options);
  at::Tensor integrate_pmf(const at::Tensor& y, at::Tensor z, const SamplerOptions& options);
  at::Tensor velocity(const at::Tensor& z, const at::Tensor& y, double t, double w);
  at::Tensor to_velocity(const at::Tensor& out, const at::Tensor& z, const at::Tensor& t) const;

  PackageSettings settings_;
  at::Device device_;
  at::ScalarType dtype_;
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader_;
};

}  // namespace jitfast
