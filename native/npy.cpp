#include "npy.h"

#include <ATen/ATen.h>

#include <cstdint>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <vector>

namespace jitfast {
namespace {

const std::string kMagic = "\x93NUMPY";

std::runtime_error npy_error(const std::string& path, const std::string& what) {
  return std::runtime_error(path + ": " + what);
}

// The text of `key`'s value in a header such as
// {'descr': '<f4', 'fortran_order': False, 'shape': (2, 3, 16, 16), }
std::string header_value(const std::string& header, const std::string& key,
                         const std::string& path) {
  const auto at = header.find("'" + key + "':");
  if (at == std::string::npos) throw npy_error(path, "not a .npy header (no '" + key + "')");
  const auto start = header.find_first_not_of(' ', at + key.size() + 3);
  const char open = start < header.size() ? header[start] : ' ';
  const auto end = open == '\'' ? header.find('\'', start + 1)
                 : open == '(' ? header.find(')', start)
                               : header.find_first_of(",}", start);
  if (end == std::string::npos) throw npy_error(path, "not a .npy header (bad '" + key + "')");
  return open == '\'' || open == '(' ? header.substr(start + 1, end - start - 1)
                                     : header.substr(start, end - start);
}

std::vector<int64_t> parse_shape(const std::string& text, const std::string& path) {
  if (text.find_first_not_of("0123456789, ") != std::string::npos)
    throw npy_error(path, "not a .npy header (shape '(" + text + ")')");
  std::vector<int64_t> shape;
  size_t pos = 0;
  while ((pos = text.find_first_of("0123456789", pos)) != std::string::npos) {
    size_t used = 0;
    shape.push_back(std::stoll(text.substr(pos), &used));
    pos += used;
  }
  return shape;
}

uint32_t little_endian(const std::string& bytes) {
  uint32_t value = 0;
  for (size_t i = bytes.size(); i-- > 0;) value = value << 8 | static_cast<uint8_t>(bytes[i]);
  return value;
}

}  // namespace

at::Tensor read_npy(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw npy_error(path, "cannot open the file");
  const std::string data{std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>()};
  if (data.compare(0, kMagic.size(), kMagic) != 0 || data.size() < 10)
    throw npy_error(path, "not a .npy file (no \\x93NUMPY magic)");
  const int major = data[6];
  const size_t length_bytes = major == 1 ? 2 : 4;
  const size_t header_start = 8 + length_bytes;
  if (major < 1 || major > 3 || data.size() < header_start)
    throw npy_error(path, "unsupported .npy format version " + std::to_string(major));
  const size_t header_size = little_endian(data.substr(8, length_bytes));
  if (data.size() < header_start + header_size) throw npy_error(path, "truncated header");
  const std::string header = data.substr(header_start, header_size);

  const std::string descr = header_value(header, "descr", path);
  at::ScalarType type;
  if (descr == "<f4") type = at::kFloat;
  else if (descr == "|u1" || descr == "<u1") type = at::kByte;
  else
    throw npy_error(path, "dtype '" + descr + "' is not supported: save float32 "
                          "(little endian, '<f4') or uint8 arrays");
  if (header_value(header, "fortran_order", path) != "False")
    throw npy_error(path, "Fortran-ordered arrays are not supported: save a C-ordered array "
                          "(np.ascontiguousarray)");
  const auto shape = parse_shape(header_value(header, "shape", path), path);

  auto tensor = at::empty(shape, at::TensorOptions().dtype(type));
  const size_t expected = tensor.nbytes();
  const size_t found = data.size() - header_start - header_size;
  if (found != expected)
    throw npy_error(path, "holds " + std::to_string(found) + " bytes of data, but its header (" +
                          header + ") needs " + std::to_string(expected));
  std::copy(data.begin() + header_start + header_size, data.end(),
            static_cast<char*>(tensor.data_ptr()));
  return tensor;
}

void write_npy(const std::string& path, const at::Tensor& tensor) {
  const auto array = tensor.cpu().contiguous();
  std::string descr;
  if (array.scalar_type() == at::kFloat) descr = "<f4";
  else if (array.scalar_type() == at::kByte) descr = "|u1";
  else throw npy_error(path, "only float32 and uint8 arrays are written");
  std::string shape;
  for (const auto size : array.sizes()) shape += std::to_string(size) + ", ";
  if (array.dim() > 1) shape.resize(shape.size() - 2);  // (3,) for one dimension, (2, 3) else
  else if (array.dim() == 1) shape.pop_back();
  std::string header = "{'descr': '" + descr + "', 'fortran_order': False, 'shape': (" + shape +
                       "), }";
  header.resize(((10 + header.size() + 1 + 63) / 64) * 64 - 10 - 1, ' ');  // align data to 64
  header += '\n';
  std::ofstream file(path, std::ios::binary);
  const char length[2] = {static_cast<char>(header.size() & 0xff),
                          static_cast<char>(header.size() >> 8)};
  file << kMagic << '\x01' << '\x00';
  file.write(length, 2);
  file << header;
  file.write(static_cast<const char*>(array.data_ptr()), array.nbytes());
  if (!file) throw npy_error(path, "cannot write the file");
}

}  // namespace jitfast
