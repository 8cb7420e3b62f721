// PNG output through libpng, when CMake found it (JITFAST_PNG).
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace jitfast {

extern const bool kPngSupport;  // false: built without libpng, write_png throws

// Writes an (H, W, C) uint8 image, C = 1 (gray), 3 (RGB) or 4 (RGBA).
void write_png(const std::string& path, const at::Tensor& image);

}  // namespace jitfast
