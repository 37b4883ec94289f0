// The embedding example of README.md ("C++ runtime"): run an artifact on inputs filled with ones
// (float32 inputs, or int64 token ids) and print each output's first value.
#include <cstdio>
#include <vector>

#include "cachefit_runtime.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s ARTIFACT_DIR\n", argv[0]);
    return 2;
  }
  try {
    cachefit::Pipeline pipe = cachefit::Pipeline::load(argv[1]);  // checks sha256s, loads each stage on its device
    cachefit::TensorMap inputs;
    for (const cachefit::TensorDesc& d : pipe.inputs()) {
      if (d.dtype == "float32") {
        inputs[d.name] = cachefit::HostTensor::from_vector(d.dtype, d.shape, std::vector<float>(d.numel(), 1.0f));
      } else {
        inputs[d.name] = cachefit::HostTensor::from_vector(d.dtype, d.shape, std::vector<int64_t>(d.numel(), 1));
      }
    }
    cachefit::TensorMap outputs = pipe.run(inputs);  // by name, in host memory
    for (const auto& [name, t] : outputs) {
      double first = (t.dtype == "float32" && t.numel() > 0) ? t.data_as<float>()[0] : 0.0;
      std::printf("%s %s %lld %.9g\n", name.c_str(), t.dtype.c_str(), static_cast<long long>(t.numel()), first);
    }
    return 0;
  } catch (const cachefit::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}
