// safetensors I/O (the Hugging Face format): 8-byte little-endian header
// length, a JSON header mapping names to {dtype, shape, data_offsets}, then the
// raw little-endian data. The reader validates everything and throws an
// InputError naming the file and the offending tensor or field.
#pragma once

#include <map>
#include <string>

#include "harness/tensor.hpp"

namespace attnbench {

struct SafetensorsFile {
  TensorMap tensors;                            // dtypes as stored
  std::map<std::string, std::string> metadata;  // __metadata__
};

SafetensorsFile read_safetensors(const std::string& path);
/// Written to a temporary name and renamed: no partial file on failure.
void write_safetensors(const std::string& path, const TensorMap& tensors,
                       const std::map<std::string, std::string>& metadata);

}  // namespace attnbench
