#include "png_writer.h"

#include <stdexcept>

#ifdef JITFAST_PNG
#include <png.h>

#include <cstring>
#endif

namespace jitfast {

#ifdef JITFAST_PNG
const bool kPngSupport = true;

void write_png(const std::string& path, const at::Tensor& image) {
  const auto pixels = image.contiguous();
  png_image png;
  std::memset(&png, 0, sizeof png);
  png.version = PNG_IMAGE_VERSION;
  png.height = static_cast<png_uint_32>(pixels.size(0));
  png.width = static_cast<png_uint_32>(pixels.size(1));
  switch (pixels.size(2)) {
    case 1: png.format = PNG_FORMAT_GRAY; break;
    case 3: png.format = PNG_FORMAT_RGB; break;
    case 4: png.format = PNG_FORMAT_RGBA; break;
    default:
      throw std::runtime_error("PNG output needs 1, 3 or 4 channels, the images have " +
                               std::to_string(pixels.size(2)));
  }
  if (!png_image_write_to_file(&png, path.c_str(), 0, pixels.data_ptr(), 0, nullptr))
    throw std::runtime_error("cannot write " + path + ": " + png.message);
}
#else
const bool kPngSupport = false;

void write_png(const std::string&, const at::Tensor&) {
  throw std::runtime_error("this jitfast-sample was built without libpng: no PNG output");
}
#endif

}  // namespace jitfast
