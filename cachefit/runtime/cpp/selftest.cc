// cachefit-selftest: exposes the runtime's SHA-256 and the .npy/.npz code to tests/test_cpp_runtime.py.
// Not installed; a test helper only.
//
//   cachefit-selftest sha256 FILE...     "<sha256_file> <sha256_hex of the bytes> FILE" per file
//   cachefit-selftest npz-list IN.npz    "name dtype [shape]" per array, in file order
//   cachefit-selftest npz-copy IN.npz OUT.npz   read IN and write its arrays (C order, little-endian) to OUT
//   cachefit-selftest load ARTIFACT      Pipeline::load; "loaded N stages", or for a CpuFeatureError
//                                        "CpuFeatureError mcpu=<> host=<> missing=<a,b>" (exit 3)
#include <cstdio>
#include <exception>
#include <fstream>
#include <iterator>
#include <string>
#include <utility>
#include <vector>

#include "cachefit_runtime.h"
#include "npz.h"

namespace {

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

int usage() {
  std::fputs("usage: cachefit-selftest sha256 FILE... | npz-list IN.npz | npz-copy IN.npz OUT.npz | load ARTIFACT\n", stderr);
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return usage();
  const std::string cmd = argv[1];
  try {
    if (cmd == "sha256") {
      for (int i = 2; i < argc; ++i) {
        std::ifstream f(argv[i], std::ios::binary);
        std::vector<char> bytes((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
        std::printf("%s %s %s\n", cachefit::sha256_file(argv[i]).c_str(),
                    cachefit::sha256_hex(bytes.data(), bytes.size()).c_str(), argv[i]);
      }
      return 0;
    }
    if (cmd == "npz-list" && argc == 3) {
      for (const auto& [name, t] : cachefit::npz::load_npz(argv[2])) {
        std::printf("%s %s %s\n", name.c_str(), t.dtype.c_str(), shape_str(t.shape).c_str());
      }
      return 0;
    }
    if (cmd == "npz-copy" && argc == 4) {
      auto arrays = cachefit::npz::load_npz(argv[2]);
      std::vector<std::pair<std::string, const cachefit::HostTensor*>> refs;
      for (const auto& [name, t] : arrays) refs.emplace_back(name, &t);
      cachefit::npz::save_npz(argv[3], refs);
      return 0;
    }
    if (cmd == "load" && argc == 3) {
      try {
        cachefit::Pipeline pipe = cachefit::Pipeline::load(argv[2]);
        std::printf("loaded %zu stages\n", pipe.num_stages());
        return 0;
      } catch (const cachefit::CpuFeatureError& e) {
        std::string missing;
        for (const std::string& f : e.missing()) missing += (missing.empty() ? "" : ",") + f;
        std::printf("CpuFeatureError mcpu=%s host=%s missing=%s kind_artifact=%d\n", e.mcpu().c_str(),
                    e.host_model().c_str(), missing.c_str(), e.kind() == cachefit::Error::Kind::kArtifact);
        return 3;
      }
    }
    return usage();
  } catch (const cachefit::Error& e) {
    std::fprintf(stderr, "cachefit-selftest: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cachefit-selftest: internal error: %s\n", e.what());
    return 1;
  }
}
