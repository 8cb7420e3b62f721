// jitfast-sample: sample a JiT or pMF network exported by `python -m jitfast.export`, with no
// Python at run time.
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "npy.h"
#include "png_writer.h"
#include "sampler.h"

namespace {

const char kUsage[] = R"(usage: jitfast-sample --package MODEL.pt2 --labels L[,L...]
                     --out IMAGES.npy [--steps 50] [--method heun] [--schedule linear]
                     [--cfg 1.0]
                     [--interval LO HI] [--seed 0 | --z0 Z0.npy] [--raw RAW.npy]
                     [--png-dir DIR] [--image-size N]

Samples one image per label from a package written by `python -m jitfast.export`.

A JiT package, as jitfast's Denoiser.generate does: Heun steps with a last Euler step (or Euler
throughout) on the linear grid t_i = i/steps, classifier-free guidance with weight cfg where
LO < t < HI (t < HI when LO is 0), a float32 state starting from noise_scale * z0; or one of its
exponential methods (one evaluation per step, a grid point on each end of the guidance interval,
each step's guidance decided at its midpoint).

A pixel MeanFlow (pMF) package, as jitfast's PMFSampler.generate does: z <- z - (t - r) * u on
the grid t = 1, ..., 0 of `steps` equal steps (pMF's time: t = 1 is noise), one network pass per
step, a float32 state starting from noise_scale * z0. Guidance is an input of the network: --cfg
is its scale omega (>= 1) and --interval its interval [t_min, t_max]; both default to the
settings the package was exported with. --method and --schedule are JiT's: a pMF package takes
only pmf and linear, the defaults it gets.

  --package     the exported package (.pt2)
  --labels      comma-separated class ids in [0, num_classes]; num_classes is the null class
  --out         uint8 images (B, H, W, C) as a .npy
  --steps       ODE steps (default 50; pMF: 1)
  --method      heun (default), euler, or ddim, dpm2m, dpm3m, unipc2, unipc3 (JiT only)
  --schedule    the exponential methods' grid: linear (default), cosine or lambda (JiT only)
  --cfg         guidance scale (default 1.0: no guidance); pMF: omega (default: the package's)
  --interval    guidance interval (default 0 1); pMF: t_min t_max (default: the package's)
  --seed        z0 = torch.randn((B, C, H, W), generator=torch.Generator().manual_seed(SEED)),
                drawn on the CPU whatever the package's device (default 0)
  --z0          a float32 (B, C, H, W) .npy of the standard-normal start instead
  --raw         also write the float32 images (B, C, H, W), in [-1, 1] before clipping
  --png-dir     also write one PNG per image, DIR/000000.png, ...
  --image-size  refuse a package that does not make images of this size
)";

struct UsageError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// The sampling flags given; the others take the package's defaults (Sampler::default_options).
struct SamplingFlags {
  std::optional<int64_t> steps;
  std::optional<std::string> method, schedule;
  std::optional<double> cfg, lo, hi;

  jitfast::SamplerOptions over(jitfast::SamplerOptions o) const {
    o.steps = steps.value_or(o.steps);
    o.method = method.value_or(o.method);
    o.schedule = schedule.value_or(o.schedule);
    o.cfg = cfg.value_or(o.cfg);
    o.lo = lo.value_or(o.lo);
    o.hi = hi.value_or(o.hi);
    return o;
  }
};

struct Args {
  std::string package, out, z0, raw, png_dir;
  std::vector<int64_t> labels;
  SamplingFlags sampling;
  uint64_t seed = 0;
  std::optional<int64_t> image_size;
};

template <typename T>
T number(const std::string& flag, const std::string& text) {
  try {
    size_t used = 0;
    T value;
    if constexpr (std::is_floating_point<T>::value) value = std::stod(text, &used);
    else if constexpr (std::is_unsigned<T>::value) value = std::stoull(text, &used);
    else value = std::stoll(text, &used);
    if (used == text.size() && (std::is_signed<T>::value || text.find('-') == std::string::npos))
      return value;
  } catch (const std::logic_error&) {
  }
  throw UsageError(flag + " expects " +
                   (std::is_floating_point<T>::value ? "a number"
                    : std::is_unsigned<T>::value   ? "a non-negative integer"
                                                   : "an integer") +
                   ", got '" + text + "'");
}

std::vector<int64_t> label_list(const std::string& text) {
  std::vector<int64_t> labels;
  size_t start = 0;
  while (start <= text.size()) {
    const auto end = std::min(text.find(',', start), text.size());
    labels.push_back(number<int64_t>("--labels", text.substr(start, end - start)));
    start = end + 1;
  }
  return labels;
}

Args parse_args(int argc, char** argv) {
  Args args;
  bool seed_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string flag = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError(flag + " needs a value");
      return argv[++i];
    };
    if (flag == "-h" || flag == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (flag == "--package") args.package = value();
    else if (flag == "--labels") args.labels = label_list(value());
    else if (flag == "--out") args.out = value();
    else if (flag == "--steps") args.sampling.steps = number<int64_t>(flag, value());
    else if (flag == "--method") args.sampling.method = value();
    else if (flag == "--schedule") args.sampling.schedule = value();
    else if (flag == "--cfg") args.sampling.cfg = number<double>(flag, value());
    else if (flag == "--interval") {
      args.sampling.lo = number<double>(flag, value());
      args.sampling.hi = number<double>(flag, value());
    } else if (flag == "--seed") {
      args.seed = number<uint64_t>(flag, value());
      seed_given = true;
    } else if (flag == "--z0") args.z0 = value();
    else if (flag == "--raw") args.raw = value();
    else if (flag == "--png-dir") args.png_dir = value();
    else if (flag == "--image-size") args.image_size = number<int64_t>(flag, value());
    else throw UsageError("unknown option '" + flag + "'");
  }
  for (const auto& [given, flag] : {std::pair{args.package.empty(), "--package"},
                                    std::pair{args.labels.empty(), "--labels"},
                                    std::pair{args.out.empty(), "--out"}})
    if (given) throw UsageError(std::string(flag) + " is required");
  if (seed_given && !args.z0.empty()) throw UsageError("give --seed or --z0, not both");
  if (!args.png_dir.empty() && !jitfast::kPngSupport)
    throw UsageError("--png-dir: this jitfast-sample was built without libpng (CMake did not "
                     "find it); install libpng and rebuild, or use the .npy");
  return args;
}

int run(const Args& args) {
  jitfast::Sampler sampler(args.package);
  const auto& settings = sampler.settings();
  if (args.image_size && *args.image_size != settings.input_size)
    throw std::invalid_argument(args.package + " makes " + std::to_string(settings.input_size) +
                                " px images, but --image-size " +
                                std::to_string(*args.image_size) + " was asked for");
  const auto labels = at::tensor(args.labels, at::kLong);
  const int64_t size = settings.input_size;
  const auto z0 = args.z0.empty()
                      ? at::randn({labels.size(0), settings.in_channels, size, size},
                                  at::detail::createCPUGenerator(args.seed), at::kFloat)
                      : jitfast::read_npy(args.z0);
  const auto start = std::chrono::steady_clock::now();
  const auto options = args.sampling.over(sampler.default_options());
  const auto images = sampler.generate(labels, z0, options);
  const std::chrono::duration<double> seconds = std::chrono::steady_clock::now() - start;
  // jitfast.images.to_uint8: round(clip(255 * (x + 1) / 2)), NHWC
  const auto pixels = (((images + 1) / 2).permute({0, 2, 3, 1}) * 255)
                          .clamp(0, 255).round().to(at::kByte).contiguous();
  jitfast::write_npy(args.out, pixels);
  if (!args.raw.empty()) jitfast::write_npy(args.raw, images);
  if (!args.png_dir.empty()) {
    std::filesystem::create_directories(args.png_dir);
    for (int64_t i = 0; i < pixels.size(0); ++i) {
      char name[32];
      std::snprintf(name, sizeof name, "%06lld.png", static_cast<long long>(i));
      jitfast::write_png((std::filesystem::path(args.png_dir) / name).string(), pixels[i]);
    }
  }
  std::cout << "sampled " << pixels.size(0) << " images (" << size << "x" << size << "x"
            << settings.in_channels << ") in " << seconds.count() << " s on "
            << settings.device << " (" << settings.dtype << "); wrote " << args.out
            << (args.png_dir.empty() ? "" : " and PNGs in " + args.png_dir) << "\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const UsageError& err) {
    std::cerr << "jitfast-sample: error: " << err.what() << "\n(jitfast-sample --help for usage)\n";
    return 2;
  } catch (const c10::Error& err) {
    std::cerr << "jitfast-sample: error: " << err.what_without_backtrace() << "\n";
  } catch (const std::exception& err) {
    std::cerr << "jitfast-sample: error: " << err.what() << "\n";
  }
  return 1;
}
