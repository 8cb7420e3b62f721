// .npy files (NumPy's format): float32 and uint8 arrays in C order, little endian.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>

namespace jitfast {

// A CPU tensor of the array in `path`; throws std::runtime_error naming the file and what is
// wrong (not a .npy, another dtype, Fortran order, truncated).
at::Tensor read_npy(const std::string& path);

// Writes a float32 or uint8 tensor as a version 1.0 .npy, what np.load reads.
void write_npy(const std::string& path, const at::Tensor& tensor);

}  // namespace jitfast
