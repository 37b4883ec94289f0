// cachefit C++ runtime: manifest checks, SHA-256, weights files, stage loading and running.
// The artifact format is docs/artifact-format.md; the Python twin is cachefit/runtime/loader.py.
#include "cachefit_runtime.h"

#include <dlfcn.h>
#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/error.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/optional.h>
#include <tvm/ffi/string.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <utility>

#ifndef CACHEFIT_TVM_LIB_DIR
#define CACHEFIT_TVM_LIB_DIR ""
#endif

namespace cachefit {

namespace ffi = tvm::ffi;
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

constexpr const char* kFormat = "cachefit-artifact";
constexpr int kPooledAllocator = 2;  // tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR
constexpr uint64_t kMaxWeightsHeader = 100ull * 1024 * 1024;

Error artifact_error(const std::string& msg) { return Error(Error::Kind::kArtifact, msg); }
Error input_error(const std::string& msg) { return Error(Error::Kind::kInput, msg); }
Error device_error(const std::string& msg) { return Error(Error::Kind::kDevice, msg); }
Error runtime_error(const std::string& msg) { return Error(Error::Kind::kRuntime, msg); }

// ---------------------------------------------------------------------------------------------
// dtypes

struct DtypeInfo {
  const char* name;
  const char* code;  // safetensors dtype code
  std::size_t size;
};

constexpr std::array<DtypeInfo, 15> kDtypes = {{
    {"float64", "F64", 8}, {"float32", "F32", 4},      {"float16", "F16", 2},          {"bfloat16", "BF16", 2},
    {"int64", "I64", 8},   {"int32", "I32", 4},        {"int16", "I16", 2},            {"int8", "I8", 1},
    {"uint64", "U64", 8},  {"uint32", "U32", 4},       {"uint16", "U16", 2},           {"uint8", "U8", 1},
    {"bool", "BOOL", 1},   {"float8_e4m3fn", "F8_E4M3", 1}, {"float8_e5m2", "F8_E5M2", 1},
}};

const DtypeInfo* find_dtype(const std::string& name) {
  for (const auto& d : kDtypes) {
    if (name == d.name) return &d;
  }
  return nullptr;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

std::string names_str(const std::vector<TensorDesc>& descs) {
  std::string s = "[";
  for (std::size_t i = 0; i < descs.size(); ++i) s += (i ? ", '" : "'") + descs[i].name + "'";
  return s + "]";
}

std::string sig_str(const TensorDesc& d) { return d.name + " " + d.dtype + shape_str(d.shape); }

int64_t checked_numel(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return -1;
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / 4 / d) return -1;
    n *= d;
  }
  return n;
}

std::string hex_prefix(const std::string& digest) { return digest.substr(0, 16) + "..."; }

// ---------------------------------------------------------------------------------------------
// SHA-256 (FIPS 180-4, section 6.2)

class Sha256 {
 public:
  Sha256() { reset(); }
  void reset() {
    static const uint32_t kInit[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                      0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    std::copy(kInit, kInit + 8, h_);
    buffered_ = 0;
    total_bytes_ = 0;
  }
  void update(const uint8_t* p, std::size_t n) {
    total_bytes_ += n;
    if (buffered_ > 0) {
      std::size_t take = std::min(n, std::size_t(64) - buffered_);
      std::memcpy(buffer_ + buffered_, p, take);
      buffered_ += take;
      p += take;
      n -= take;
      if (buffered_ < 64) return;
      compress(buffer_);
      buffered_ = 0;
    }
    for (; n >= 64; p += 64, n -= 64) compress(p);
    if (n > 0) {
      std::memcpy(buffer_, p, n);
      buffered_ = n;
    }
  }
  std::string hex_digest() {
    // Padding (5.1.1): a 1 bit, zeros up to 56 mod 64 bytes, then the bit length big-endian.
    const uint64_t bit_length = total_bytes_ * 8;
    uint8_t pad[72] = {0x80};
    std::size_t pad_len = (buffered_ < 56) ? 56 - buffered_ : 120 - buffered_;
    for (int i = 0; i < 8; ++i) pad[pad_len + i] = static_cast<uint8_t>(bit_length >> (56 - 8 * i));
    update(pad, pad_len + 8);
    static const char* kHex = "0123456789abcdef";
    std::string out(64, '0');
    for (int i = 0; i < 8; ++i) {
      for (int j = 0; j < 8; ++j) out[i * 8 + j] = kHex[(h_[i] >> (28 - 4 * j)) & 0xf];
    }
    reset();
    return out;
  }

 private:
  static uint32_t rotr(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }
  void compress(const uint8_t* block) {
    static const uint32_t kK[64] = {
        0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
        0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
        0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
        0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
        0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
        0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
        0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
        0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
    uint32_t w[64];
    for (int t = 0; t < 16; ++t) {
      w[t] = (uint32_t(block[4 * t]) << 24) | (uint32_t(block[4 * t + 1]) << 16) |
             (uint32_t(block[4 * t + 2]) << 8) | uint32_t(block[4 * t + 3]);
    }
    for (int t = 16; t < 64; ++t) {
      uint32_t s0 = rotr(w[t - 15], 7) ^ rotr(w[t - 15], 18) ^ (w[t - 15] >> 3);
      uint32_t s1 = rotr(w[t - 2], 17) ^ rotr(w[t - 2], 19) ^ (w[t - 2] >> 10);
      w[t] = w[t - 16] + s0 + w[t - 7] + s1;
    }
    uint32_t a = h_[0], b = h_[1], c = h_[2], d = h_[3], e = h_[4], f = h_[5], g = h_[6], h = h_[7];
    for (int t = 0; t < 64; ++t) {
      uint32_t big_s1 = rotr(e, 6) ^ rotr(e, 11) ^ rotr(e, 25);
      uint32_t ch = (e & f) ^ (~e & g);
      uint32_t t1 = h + big_s1 + ch + kK[t] + w[t];
      uint32_t big_s0 = rotr(a, 2) ^ rotr(a, 13) ^ rotr(a, 22);
      uint32_t maj = (a & b) ^ (a & c) ^ (b & c);
      uint32_t t2 = big_s0 + maj;
      h = g;
      g = f;
      f = e;
      e = d + t1;
      d = c;
      c = b;
      b = a;
      a = t1 + t2;
    }
    h_[0] += a;
    h_[1] += b;
    h_[2] += c;
    h_[3] += d;
    h_[4] += e;
    h_[5] += f;
    h_[6] += g;
    h_[7] += h;
  }

  uint32_t h_[8];
  uint8_t buffer_[64];
  std::size_t buffered_;
  uint64_t total_bytes_;
};

std::vector<uint8_t> read_file(const fs::path& path, const std::string& what) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw artifact_error("cannot open " + path.string() + " (" + what + ")");
  f.seekg(0, std::ios::end);
  std::streamoff size = f.tellg();
  f.seekg(0, std::ios::beg);
  if (size < 0) throw artifact_error("cannot read " + path.string() + " (" + what + ")");
  std::vector<uint8_t> data(static_cast<std::size_t>(size));
  if (size > 0 && !f.read(reinterpret_cast<char*>(data.data()), size)) {
    throw artifact_error("cannot read " + path.string() + " (" + what + "): short read");
  }
  return data;
}

// ---------------------------------------------------------------------------------------------
// manifest.json

struct FileEntry {
  std::string file;
  std::string sha256;
};

struct StageSpec {
  int index = 0;
  std::string name, function;
  int first_layer = 0, last_layer = 0;
  std::string device_kind;  // "cpu" or "cuda"
  int device_index = 0;
  FileEntry library, weights;
  std::vector<TensorDesc> inputs, params, outputs;
};

struct Manifest {
  fs::path path;
  std::string model_name, target_kind;
  std::string mcpu;                        // target.mcpu; "" when null or absent
  std::vector<std::string> cpu_features;   // target.cpu_features (LLVM names); empty when absent
  std::vector<TensorDesc> inputs, outputs;
  std::vector<StageSpec> stages;
};

// Field access with messages that say where in manifest.json the problem is.
class Reader {
 public:
  explicit Reader(std::string file) : file_(std::move(file)) {}
  const json& at(const json& obj, const char* key, const std::string& where) const {
    if (!obj.is_object()) fail(where + " is not a JSON object");
    auto it = obj.find(key);
    if (it == obj.end()) fail(where + " has no field '" + key + "'");
    return *it;
  }
  std::string str(const json& obj, const char* key, const std::string& where) const {
    const json& v = at(obj, key, where);
    if (!v.is_string()) fail(where + "." + key + " is not a string");
    return v.get<std::string>();
  }
  int64_t integer(const json& obj, const char* key, const std::string& where) const {
    const json& v = at(obj, key, where);
    if (!v.is_number_integer()) fail(where + "." + key + " is not an integer");
    return v.get<int64_t>();
  }
  const json& list(const json& obj, const char* key, const std::string& where) const {
    const json& v = at(obj, key, where);
    if (!v.is_array()) fail(where + "." + key + " is not a list");
    return v;
  }
  std::vector<TensorDesc> tensors(const json& obj, const char* key, const std::string& where) const {
    std::vector<TensorDesc> out;
    const json& arr = list(obj, key, where);
    for (std::size_t i = 0; i < arr.size(); ++i) {
      std::string w = where + "." + key + "[" + std::to_string(i) + "]";
      TensorDesc d;
      d.name = str(arr[i], "name", w);
      d.dtype = str(arr[i], "dtype", w);
      if (!find_dtype(d.dtype)) {
        fail(w + " (" + d.name + ") has dtype '" + d.dtype +
             "', which this runtime does not know; upgrade the cachefit C++ runtime");
      }
      const json& shape = list(arr[i], "shape", w);
      for (const json& dim : shape) {
        if (!dim.is_number_integer() || dim.get<int64_t>() < 0) {
          fail(w + " (" + d.name + ") has a shape that is not a list of non-negative integers: " + shape.dump());
        }
        d.shape.push_back(dim.get<int64_t>());
      }
      if (checked_numel(d.shape) < 0) fail(w + " (" + d.name + ") has an implausibly large shape " + shape.dump());
      out.push_back(std::move(d));
    }
    return out;
  }
  [[noreturn]] void fail(const std::string& msg) const {
    throw artifact_error(file_ + " is malformed: " + msg + "; recompile the model (cachefit compile)");
  }

 private:
  std::string file_;
};

bool same_sig(const std::vector<TensorDesc>& a, const std::vector<TensorDesc>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i) {
    if (a[i].name != b[i].name || a[i].shape != b[i].shape || a[i].dtype != b[i].dtype) return false;
  }
  return true;
}

std::string sigs_str(const std::vector<TensorDesc>& descs) {
  std::string s;
  for (std::size_t i = 0; i < descs.size(); ++i) s += (i ? ", " : "") + sig_str(descs[i]);
  return "(" + s + ")";
}

Manifest read_manifest(const fs::path& root) {
  std::error_code ec;
  if (!fs::is_directory(root, ec)) {
    throw artifact_error("artifact directory " + root.string() +
                         " does not exist; compile a model first (cachefit compile MODEL.onnx -o " + root.string() + ")");
  }
  Manifest m;
  m.path = root / "manifest.json";
  const std::string file = m.path.string();
  if (!fs::is_regular_file(m.path, ec)) {
    throw artifact_error(file + " is missing: " + root.string() +
                         " is not a cachefit artifact directory (compile with cachefit compile -o " + root.string() + ")");
  }
  std::vector<uint8_t> bytes = read_file(m.path, "the manifest");
  json j = json::parse(bytes.begin(), bytes.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    throw artifact_error(file + " is not valid JSON; the artifact is damaged: recompile the model");
  }
  Reader r(file);
  if (!j.is_object() || !j.contains("format") || j["format"] != kFormat) {
    std::string got = (j.is_object() && j.contains("format")) ? j["format"].dump() : "none";
    throw artifact_error(file + " is not a cachefit manifest (format " + got + ", expected \"" + kFormat + "\")");
  }
  if (!j.contains("format_version") || !j["format_version"].is_number_integer()) {
    throw artifact_error(file + " has no integer format_version");
  }
  int64_t version = j["format_version"].get<int64_t>();
  if (version > kFormatVersion) {
    throw artifact_error(file + " has format version " + std::to_string(version) +
                         ", newer than this runtime reads (up to " + std::to_string(kFormatVersion) +
                         "); upgrade the cachefit C++ runtime or recompile the model with a matching cachefit");
  }
  if (version < 1) throw artifact_error(file + " has format version " + std::to_string(version) + "; versions start at 1");

  const json& target = r.at(j, "target", "manifest");
  m.target_kind = r.str(target, "kind", "target");
  if (m.target_kind != "llvm" && m.target_kind != "cuda") {
    r.fail("target.kind is '" + m.target_kind + "', expected 'llvm' or 'cuda'");
  }
  if (target.contains("mcpu") && !target["mcpu"].is_null()) m.mcpu = r.str(target, "mcpu", "target");
  if (target.contains("cpu_features") && !target["cpu_features"].is_null()) {
    for (const json& f : r.list(target, "cpu_features", "target")) {
      if (!f.is_string()) r.fail("target.cpu_features is not a list of strings: " + target["cpu_features"].dump());
      m.cpu_features.push_back(f.get<std::string>());
    }
  }
  const json& model = r.at(j, "model", "manifest");
  m.model_name = (model.is_object() && model.contains("name") && model["name"].is_string())
                     ? model["name"].get<std::string>()
                     : std::string("model");
  m.inputs = r.tensors(j, "inputs", "manifest");
  m.outputs = r.tensors(j, "outputs", "manifest");
  const json& stages = r.list(j, "stages", "manifest");
  if (stages.empty()) throw artifact_error(file + " lists no stages");
  for (std::size_t i = 0; i < stages.size(); ++i) {
    const json& s = stages[i];
    std::string w = "stages[" + std::to_string(i) + "]";
    StageSpec st;
    st.index = static_cast<int>(r.integer(s, "index", w));
    if (st.index != static_cast<int>(i)) r.fail(w + " has index " + std::to_string(st.index));
    st.name = r.str(s, "name", w);
    st.function = r.str(s, "function", w);
    const json& layers = r.at(s, "layers", w);
    st.first_layer = static_cast<int>(r.integer(layers, "first", w + ".layers"));
    st.last_layer = static_cast<int>(r.integer(layers, "last", w + ".layers"));
    const json& dev = r.at(s, "device", w);
    st.device_kind = r.str(dev, "kind", w + ".device");
    if (st.device_kind != "cpu" && st.device_kind != "cuda") {
      r.fail(w + ".device.kind is '" + st.device_kind + "', expected 'cpu' or 'cuda'");
    }
    const int64_t device_index = dev.contains("index") ? r.integer(dev, "index", w + ".device") : st.index;
    if (device_index < 0 || device_index > 1 << 20) r.fail(w + ".device.index " + std::to_string(device_index) + " is not a device index");
    st.device_index = static_cast<int>(device_index);
    for (auto [key, entry] : {std::make_pair("library", &st.library), std::make_pair("weights", &st.weights)}) {
      const json& e = r.at(s, key, w);
      entry->file = r.str(e, "file", w + "." + key);
      entry->sha256 = r.str(e, "sha256", w + "." + key);
      if (entry->file.empty() || entry->file.find('/') != std::string::npos ||
          entry->file.find('\\') != std::string::npos || entry->file[0] == '.') {
        r.fail(w + "." + key + ".file '" + entry->file + "' must be a plain file name inside the artifact directory");
      }
      if (entry->sha256.size() != 64 ||
          entry->sha256.find_first_not_of("0123456789abcdef") != std::string::npos) {
        r.fail(w + "." + key + ".sha256 is not a lowercase hex SHA-256 digest");
      }
    }
    st.inputs = r.tensors(s, "inputs", w);
    st.params = r.tensors(s, "params", w);
    st.outputs = r.tensors(s, "outputs", w);
    m.stages.push_back(std::move(st));
  }
  // The chaining rule (docs/artifact-format.md).
  if (!same_sig(m.stages.front().inputs, m.inputs)) {
    throw artifact_error(file + ": stage 0's inputs " + sigs_str(m.stages.front().inputs) +
                         " are not the model inputs " + sigs_str(m.inputs));
  }
  if (!same_sig(m.stages.back().outputs, m.outputs)) {
    throw artifact_error(file + ": the last stage's outputs " + sigs_str(m.stages.back().outputs) +
                         " are not the model outputs " + sigs_str(m.outputs));
  }
  for (std::size_t i = 0; i + 1 < m.stages.size(); ++i) {
    if (!same_sig(m.stages[i].outputs, m.stages[i + 1].inputs)) {
      throw artifact_error(file + ": stage " + std::to_string(i + 1) + "'s inputs " + sigs_str(m.stages[i + 1].inputs) +
                           " are not stage " + std::to_string(i) + "'s outputs " + sigs_str(m.stages[i].outputs));
    }
  }
  return m;
}

void verify_files(const fs::path& root, const Manifest& m) {
  for (const StageSpec& st : m.stages) {
    for (auto [key, entry] : {std::make_pair("library", &st.library), std::make_pair("weights", &st.weights)}) {
      fs::path path = root / entry->file;
      std::error_code ec;
      if (!fs::is_regular_file(path, ec)) {
        throw artifact_error(path.string() + " is missing (stage " + std::to_string(st.index) + "'s " + key +
                             "); the artifact is incomplete: recompile or copy the whole directory");
      }
      std::string digest = sha256_file(path.string());
      if (digest != entry->sha256) {
        throw artifact_error(path.string() + " does not match its checksum in manifest.json (sha256 " +
                             hex_prefix(digest) + ", expected " + hex_prefix(entry->sha256) +
                             "): the file was modified or corrupted; refusing to load it. Recompile the model");
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------
// TVM helpers

std::string tvm_message(const std::exception& e) {
  if (auto* fe = dynamic_cast<const ffi::Error*>(&e)) return fe->kind() + ": " + fe->message();
  return e.what();
}

DLDevice to_dl(const Device& d) {
  return DLDevice{d.kind == Device::Kind::kCUDA ? kDLCUDA : kDLCPU, d.index};
}

// TVM's global functions; libtvm_runtime registers them when it is loaded.
struct Runtime {
  ffi::Function alloc, copy_from_bytes, copy_to_bytes, copy_from_to, stream_sync, device_attr;

  static const Runtime& get() {
    static Runtime rt = make();
    return rt;
  }

 private:
  static ffi::Optional<ffi::Function> lookup(const char* name) { return ffi::Function::GetGlobal(name); }
  static Runtime make() {
    if (!lookup("runtime.TVMTensorAllocWithScope").has_value()) {
      // Linked with --as-needed, libtvm_runtime may not have been loaded: load it by path.
      std::string dir = CACHEFIT_TVM_LIB_DIR;
      std::string path = dir.empty() ? std::string("libtvm_runtime.so") : dir + "/libtvm_runtime.so";
      if (!dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL)) {
        const char* err = dlerror();
        throw device_error("cannot load TVM's runtime " + path + ": " + (err ? err : "unknown error") +
                           "; install apache-tvm (pip) and rebuild with the paths from `cachefit config --cmake-args`");
      }
    }
    Runtime rt;
    rt.alloc = required("runtime.TVMTensorAllocWithScope");
    rt.copy_from_bytes = required("runtime.TVMTensorCopyFromBytes");
    rt.copy_to_bytes = required("runtime.TVMTensorCopyToBytes");
    rt.copy_from_to = required("runtime.TVMTensorCopyFromTo");
    rt.stream_sync = required("runtime.Device_StreamSync");
    rt.device_attr = required("runtime.GetDeviceAttr");
    return rt;
  }
  static ffi::Function required(const char* name) {
    auto f = lookup(name);
    if (!f.has_value()) {
      throw device_error(std::string("TVM's runtime has no function ") + name +
                         "; the apache-tvm version does not match this cachefit runtime (built for TVM 0.27)");
    }
    return *f;
  }
};

void load_cuda_runtime() {
  static bool loaded = false;
  if (loaded || ffi::Function::GetGlobal("device_api.cuda").has_value()) {
    loaded = true;
    return;
  }
  std::vector<std::string> candidates;
  if (const char* env = std::getenv("TVM_LIBRARY_PATH")) candidates.push_back(std::string(env) + "/libtvm_runtime_cuda.so");
  std::string dir = CACHEFIT_TVM_LIB_DIR;
  if (!dir.empty()) candidates.push_back(dir + "/libtvm_runtime_cuda.so");
  std::string errors;
  bool tried = false;
  for (const std::string& path : candidates) {
    std::error_code ec;
    if (!fs::exists(path, ec)) continue;
    tried = true;
    if (dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL)) {
      loaded = true;
      return;
    }
    const char* err = dlerror();
    errors += "\n  " + path + ": " + (err ? err : "unknown error");
  }
  if (!tried) {  // not next to libtvm_runtime: let the dynamic loader search for it
    if (dlopen("libtvm_runtime_cuda.so", RTLD_NOW | RTLD_LOCAL)) {
      loaded = true;
      return;
    }
    const char* err = dlerror();
    errors += std::string("\n  libtvm_runtime_cuda.so: ") + (err ? err : "unknown error");
  }
  throw device_error(
      "the artifact has CUDA stages but TVM's CUDA runtime (libtvm_runtime_cuda.so) cannot be loaded:" +
      errors +
      "\nIt needs the NVIDIA driver (libcuda.so.1) and the CUDA runtime (libcudart); run on a machine with a GPU, "
      "or compile the model with --target llvm for CPU stages");
}

ffi::Tensor alloc_tensor(const std::vector<int64_t>& shape, const std::string& dtype, const Device& dev) {
  return Runtime::get()
      .alloc(ffi::Shape(shape), ffi::StringToDLDataType(dtype), to_dl(dev), ffi::Optional<ffi::String>())
      .cast<ffi::Tensor>();
}

void sync(const Device& dev) {
  if (dev.kind == Device::Kind::kCPU) return;
  Runtime::get().stream_sync(to_dl(dev), static_cast<void*>(nullptr));
}

bool same_device(const Device& a, const Device& b) {
  return a.kind == b.kind && (a.kind == Device::Kind::kCPU || a.index == b.index);
}

// ---------------------------------------------------------------------------------------------
// weights files (safetensors layout)

std::vector<ffi::Tensor> load_weights(const fs::path& path, const StageSpec& st, const Device& dev) {
  const std::string file = path.string();
  std::vector<uint8_t> bytes = read_file(path, "stage " + std::to_string(st.index) + "'s weights");
  if (bytes.size() < 8) throw artifact_error("weights file " + file + " is truncated: no header length");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | bytes[i];
  if (n > kMaxWeightsHeader || n > bytes.size() - 8) {
    throw artifact_error("weights file " + file + " has an implausible header length " + std::to_string(n) + " in a " +
                         std::to_string(bytes.size()) + "-byte file");
  }
  json header = json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(n), nullptr, false);
  if (header.is_discarded() || !header.is_object()) {
    throw artifact_error("weights file " + file + " has a malformed JSON header");
  }
  const uint8_t* data = bytes.data() + 8 + n;
  const uint64_t data_size = bytes.size() - 8 - n;
  std::vector<ffi::Tensor> params;
  for (const TensorDesc& d : st.params) {
    auto it = header.find(d.name);
    if (it == header.end()) {
      throw artifact_error("weights file " + file + " lacks weight '" + d.name + "' that stage " +
                           std::to_string(st.index) + " needs; recompile the model");
    }
    const json& info = *it;
    std::string code;
    std::vector<int64_t> shape;
    uint64_t begin = 0, end = 0;
    bool ok = info.is_object() && info.contains("dtype") && info["dtype"].is_string() && info.contains("shape") &&
              info["shape"].is_array() && info.contains("data_offsets") && info["data_offsets"].is_array() &&
              info["data_offsets"].size() == 2 && info["data_offsets"][0].is_number_unsigned() &&
              info["data_offsets"][1].is_number_unsigned();
    if (ok) {
      code = info["dtype"].get<std::string>();
      for (const json& dim : info["shape"]) {
        if (!dim.is_number_integer()) ok = false;
        else shape.push_back(dim.get<int64_t>());
      }
      begin = info["data_offsets"][0].get<uint64_t>();
      end = info["data_offsets"][1].get<uint64_t>();
    }
    if (!ok) throw artifact_error("weights file " + file + ": malformed entry for tensor '" + d.name + "'");
    const DtypeInfo* want = find_dtype(d.dtype);
    if (code != want->code || shape != d.shape) {
      throw artifact_error("weights file " + file + ": weight '" + d.name + "' is " + code + shape_str(shape) +
                           ", the manifest says " + d.dtype + shape_str(d.shape) + " (" + want->code +
                           "); recompile the model");
    }
    const uint64_t nbytes = d.nbytes();
    if (end < begin || end - begin != nbytes || end > data_size) {
      throw artifact_error("weights file " + file + ": tensor '" + d.name + "' (" + code + " " + shape_str(shape) +
                           ") needs " + std::to_string(nbytes) + " bytes, offsets [" + std::to_string(begin) + ", " +
                           std::to_string(end) + "] in a " + std::to_string(data_size) + "-byte data section");
    }
    ffi::Tensor t = alloc_tensor(d.shape, d.dtype, dev);
    if (nbytes > 0) {
      Runtime::get().copy_from_bytes(t, static_cast<void*>(const_cast<uint8_t*>(data + begin)),
                                     static_cast<int64_t>(nbytes));
    }
    params.push_back(std::move(t));
  }
  return params;
}

// The host CPU check of Pipeline::load (docs/artifact-format.md, target.cpu_features), after the
// checksums and before any library is loaded. Only llvm artifacts that list their features are checked.
void check_host_cpu(const fs::path& root, const Manifest& m, const LoadOptions& options) {
  if (m.target_kind != "llvm" || m.cpu_features.empty()) return;
  auto warn = [&](const std::string& msg) {
    if (options.warn) {
      options.warn(msg);
    } else {
      std::fprintf(stderr, "cachefit: warning: %s\n", msg.c_str());
    }
  };
  std::string features;
  for (const std::string& f : m.cpu_features) features += (features.empty() ? "" : " ") + f;
  std::string path = options.cpuinfo, origin = "LoadOptions::cpuinfo";
  if (path.empty()) {
    const char* env = std::getenv("CACHEFIT_CPUINFO");
    if (env != nullptr && *env != '\0') {
      path = env;
      origin = "CACHEFIT_CPUINFO";
    }
  }
  HostCpu host;
  if (path.empty()) {
#ifdef __linux__
    if (!read_cpuinfo("/proc/cpuinfo", &host)) {
      warn("cannot read the CPU flags from /proc/cpuinfo: not checking that this host has the CPU features (" +
           features + ") that " + root.string() + " was compiled for");
      return;
    }
#else
    warn("not a Linux host: not checking that this CPU has the features (" + features + ") that " +
         root.string() + " was compiled for (set CACHEFIT_CPUINFO to a file in /proc/cpuinfo format to check)");
    return;
#endif
  } else {
    std::ifstream probe(path);
    if (!probe) {
      throw Error(Error::Kind::kInput, origin + " names " + path + ", which cannot be read; name a file in "
                                       "/proc/cpuinfo format, or unset it to check this host's /proc/cpuinfo");
    }
    probe.close();
    if (!read_cpuinfo(path, &host)) {
      warn(path + " (" + origin + ") has no 'flags' line: not checking that this host has the CPU features (" +
           features + ") that " + root.string() + " was compiled for");
      return;
    }
  }
  check_cpu_features(root.string(), m.mcpu, m.cpu_features, host);
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// host CPU check

bool read_cpuinfo(const std::string& path, HostCpu* host) {
  std::ifstream f(path);
  if (!f) return false;
  HostCpu out;
  bool have_name = false, have_flags = false;
  std::string line;
  while (std::getline(f, line)) {
    const std::size_t colon = line.find(':');
    auto strip = [](const std::string& t) {
      const std::size_t b = t.find_first_not_of(" \t\r\n\f\v");
      if (b == std::string::npos) return std::string();
      return t.substr(b, t.find_last_not_of(" \t\r\n\f\v") - b + 1);
    };
    const std::string key = strip(line.substr(0, colon));
    const std::string value = colon == std::string::npos ? std::string() : line.substr(colon + 1);
    if (key == "model name" && !have_name) {
      out.model_name = strip(value);
      have_name = true;
    } else if (key == "flags" && !have_flags) {
      std::istringstream words(value);
      for (std::string w; words >> w;) out.flags.insert(w);
      have_flags = true;
    }
  }
  if (!have_flags) return false;
  *host = std::move(out);
  return true;
}

const std::vector<std::pair<std::string, std::string>>& cpuinfo_flag_map() {
  // Mirrors cachefit.runtime.loader.CPUINFO_FLAGS (the source), in its order.
  static const std::vector<std::pair<std::string, std::string>> kMap = {
      {"avx", "avx"},           {"avx2", "avx2"},           {"fma", "fma"},
      {"f16c", "f16c"},         {"avx512f", "avx512f"},     {"avx512bw", "avx512bw"},
      {"avx512dq", "avx512dq"}, {"avx512vl", "avx512vl"},   {"avx512cd", "avx512cd"},
      {"avx512vnni", "avx512_vnni"}, {"avx512bf16", "avx512_bf16"}, {"avx512fp16", "avx512_fp16"},
      {"amx-tile", "amx_tile"},
  };
  return kMap;
}

void check_cpu_features(const std::string& artifact, const std::string& mcpu,
                        const std::vector<std::string>& cpu_features, const HostCpu& host) {
  std::vector<std::string> missing;
  for (const std::string& feature : cpu_features) {
    for (const auto& [llvm_name, flag] : cpuinfo_flag_map()) {
      if (llvm_name == feature && !host.flags.count(flag)) missing.push_back(feature);
    }
  }
  if (missing.empty()) return;
  std::string list;
  for (const std::string& f : missing) list += (list.empty() ? "" : ", ") + f;
  // The message of cachefit.runtime.loader.check_host_cpu.
  throw CpuFeatureError(
      artifact + " was compiled for CPU " + (mcpu.empty() ? std::string("(unnamed)") : "'" + mcpu + "'") +
          ", whose code uses " + list + "; this host's CPU (" + host.model_name + ") lacks " +
          (missing.size() == 1 ? "it" : "them") +
          ", and the stages would die of an illegal instruction. Recompile on this host, or with --mcpu naming a "
          "CPU this host has (e.g. --mcpu x86-64-v3 for AVX2 without AVX-512)",
      mcpu, host.model_name, missing);
}

// ---------------------------------------------------------------------------------------------
// public helpers

std::size_t dtype_size(const std::string& dtype) {
  const DtypeInfo* d = find_dtype(dtype);
  if (!d) {
    throw Error(Error::Kind::kInput, "unknown dtype '" + dtype +
                                         "'; known: float64 float32 float16 bfloat16 int64 int32 int16 int8 uint64 "
                                         "uint32 uint16 uint8 bool float8_e4m3fn float8_e5m2");
  }
  return d->size;
}

int64_t TensorDesc::numel() const { return checked_numel(shape); }

int64_t HostTensor::numel() const { return checked_numel(shape); }

Device Device::parse(const std::string& text) {
  std::string s;
  for (char c : text) {
    if (!std::isspace(static_cast<unsigned char>(c))) s += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  }
  std::string name = s.substr(0, s.find(':'));
  std::string idx = s.find(':') == std::string::npos ? "" : s.substr(s.find(':') + 1);
  Device d;
  if (name == "cpu" || name == "llvm") {
    d.kind = Kind::kCPU;
  } else if (name == "cuda" || name == "gpu") {
    d.kind = Kind::kCUDA;
  } else {
    throw Error(Error::Kind::kDevice, "unknown device '" + text + "': use 'cpu', 'cuda' or 'cuda:<i>'");
  }
  if (!idx.empty()) {
    if (idx.size() > 6 || idx.find_first_not_of("0123456789") != std::string::npos) {
      throw Error(Error::Kind::kDevice, "bad device index in '" + text + "': use 'cpu', 'cuda' or 'cuda:<i>'");
    }
    d.index = std::stoi(idx);
  }
  return d;
}

std::string Device::str() const { return (kind == Kind::kCUDA ? "cuda:" : "cpu:") + std::to_string(index); }

TimeSummary TimeSummary::of(std::vector<double> xs) {
  TimeSummary s;
  if (xs.empty()) return s;
  std::sort(xs.begin(), xs.end());
  double sum = 0;
  for (double x : xs) sum += x;
  s.mean = sum / static_cast<double>(xs.size());
  std::size_t n = xs.size();
  s.median = (n % 2) ? xs[n / 2] : 0.5 * (xs[n / 2 - 1] + xs[n / 2]);
  s.min = xs.front();
  s.max = xs.back();
  return s;
}

std::string sha256_hex(const void* data, std::size_t size) {
  Sha256 h;
  h.update(static_cast<const uint8_t*>(data), size);
  return h.hex_digest();
}

std::string sha256_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw artifact_error("cannot open " + path + " to check its sha256");
  Sha256 h;
  std::vector<char> chunk(1 << 20);
  while (f) {
    f.read(chunk.data(), static_cast<std::streamsize>(chunk.size()));
    std::streamsize got = f.gcount();
    if (got > 0) h.update(reinterpret_cast<const uint8_t*>(chunk.data()), static_cast<std::size_t>(got));
  }
  if (f.bad()) throw artifact_error("cannot read " + path + " to check its sha256");
  return h.hex_digest();
}

// ---------------------------------------------------------------------------------------------
// Pipeline

struct LoadedStage {
  std::string name;
  Device device;
  fs::path library;
  ffi::Optional<ffi::Module> lib, vm;  // kept alive as long as the stage
  ffi::Function fn;
  std::vector<ffi::Tensor> params;
  std::vector<TensorDesc> outputs;
};

struct Pipeline::Impl {
  Manifest manifest;
  std::vector<LoadedStage> stages;
  std::vector<double> last_stage_seconds;
};

Pipeline::Pipeline(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Pipeline::Pipeline(Pipeline&&) noexcept = default;
Pipeline& Pipeline::operator=(Pipeline&&) noexcept = default;
Pipeline::~Pipeline() = default;

const std::vector<TensorDesc>& Pipeline::inputs() const { return impl_->manifest.inputs; }
const std::vector<TensorDesc>& Pipeline::outputs() const { return impl_->manifest.outputs; }
std::size_t Pipeline::num_stages() const { return impl_->stages.size(); }
const std::string& Pipeline::stage_name(std::size_t i) const { return impl_->stages.at(i).name; }
Device Pipeline::stage_device(std::size_t i) const { return impl_->stages.at(i).device; }
const std::vector<double>& Pipeline::last_stage_seconds() const { return impl_->last_stage_seconds; }
const std::string& Pipeline::target_kind() const { return impl_->manifest.target_kind; }
const std::string& Pipeline::model_name() const { return impl_->manifest.model_name; }

Pipeline Pipeline::load(const std::string& artifact_dir, const LoadOptions& options) {
  const fs::path root(artifact_dir);
  auto impl = std::make_unique<Impl>();
  impl->manifest = read_manifest(root);
  const Manifest& m = impl->manifest;
  verify_files(root, m);  // before any native code is loaded
  check_host_cpu(root, m, options);  // likewise: code for a CPU this host is not would die of SIGILL

  const std::size_t k = m.stages.size();
  if (options.devices.size() > 1 && options.devices.size() != k) {
    throw device_error(std::to_string(options.devices.size()) + " devices given for " + std::to_string(k) +
                       " stages; give one per stage or a single one");
  }
  std::vector<Device> devices;
  for (std::size_t i = 0; i < k; ++i) {
    const StageSpec& st = m.stages[i];
    Device dev;
    if (!options.devices.empty()) {
      dev = options.devices.size() == 1 ? options.devices[0] : options.devices[i];
    } else if (st.device_kind == "cuda") {
      dev = Device{Device::Kind::kCUDA, st.device_index};
    }
    if (st.device_kind == "cuda" && dev.kind != Device::Kind::kCUDA) {
      throw device_error("stage " + std::to_string(i) + " holds CUDA code; it cannot run on " + dev.str());
    }
    if (st.device_kind == "cpu" && dev.kind != Device::Kind::kCPU) {
      throw device_error("stage " + std::to_string(i) + " holds CPU code; it cannot run on " + dev.str());
    }
    if (dev.kind == Device::Kind::kCPU) dev.index = 0;
    devices.push_back(dev);
  }

  try {
    const Runtime& rt = Runtime::get();
    for (std::size_t i = 0; i < k; ++i) {
      if (devices[i].kind == Device::Kind::kCUDA) load_cuda_runtime();
      DLDevice dl = to_dl(devices[i]);
      if (rt.device_attr(static_cast<int>(dl.device_type), dl.device_id, 0).cast<int64_t>() == 0) {
        throw device_error("stage " + std::to_string(i) + " needs device " + devices[i].str() +
                           ", which this machine does not have (pass LoadOptions::devices / --devices to map stages "
                           "onto the devices present)");
      }
    }
    for (std::size_t i = 0; i < k; ++i) {
      const StageSpec& st = m.stages[i];
      LoadedStage ls;
      ls.name = st.name;
      ls.device = devices[i];
      ls.library = root / st.library.file;
      ls.outputs = st.outputs;
      const std::string lib_file = ls.library.string();
      ffi::Optional<ffi::Module> lib;
      try {
        lib = ffi::Module::LoadFromFile(lib_file);
      } catch (const std::exception& e) {
        throw artifact_error("cannot load " + lib_file + ": " + tvm_message(e));
      }
      auto load_exec = lib.value()->GetFunction("vm_load_executable", false);
      if (!load_exec.has_value()) {
        throw artifact_error(lib_file + " is not a Relax VM executable (no vm_load_executable); recompile the model");
      }
      ffi::Module vm = (*load_exec)().cast<ffi::Module>();
      ls.lib = lib;
      ls.vm = vm;
      auto init = vm->GetFunction("vm_initialization", false);
      if (!init.has_value()) throw artifact_error(lib_file + ": the VM has no vm_initialization");
      if (ls.device.kind == Device::Kind::kCPU) {
        (*init)(static_cast<int>(kDLCPU), 0, kPooledAllocator);
      } else {
        // The host (CPU) comes last: the VM runs shape computations there.
        (*init)(static_cast<int>(kDLCUDA), ls.device.index, kPooledAllocator, static_cast<int>(kDLCPU), 0,
                kPooledAllocator);
      }
      auto fn = vm->GetFunction(st.function, false);
      if (!fn.has_value()) {
        throw artifact_error(lib_file + " has no function '" + st.function + "' (stage " + std::to_string(i) +
                             "); recompile the model");
      }
      ls.fn = *fn;
      ls.params = load_weights(root / st.weights.file, st, ls.device);
      impl->stages.push_back(std::move(ls));
    }
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw runtime_error("loading " + root.string() + " failed in TVM: " + tvm_message(e));
  }
  return Pipeline(std::move(impl));
}

TensorMap Pipeline::run(const TensorMap& inputs) {
  const Manifest& m = impl_->manifest;
  for (const auto& kv : inputs) {
    bool known = std::any_of(m.inputs.begin(), m.inputs.end(), [&](const TensorDesc& d) { return d.name == kv.first; });
    if (!known) throw input_error("unknown input '" + kv.first + "'; the model's inputs are " + names_str(m.inputs));
  }
  for (const TensorDesc& d : m.inputs) {
    auto it = inputs.find(d.name);
    if (it == inputs.end()) {
      throw input_error("input '" + d.name + "' (" + d.dtype + shape_str(d.shape) +
                        ") is missing; the model's inputs are " + names_str(m.inputs));
    }
    const HostTensor& t = it->second;
    if (t.shape != d.shape) {
      throw input_error("input '" + d.name + "' has shape " + shape_str(t.shape) + ", the model expects " +
                        shape_str(d.shape) + " (recompile with --input-shapes for other shapes)");
    }
    if (t.dtype != d.dtype) {
      throw input_error("input '" + d.name + "' has dtype " + t.dtype + ", the model expects " + d.dtype +
                        "; convert it (e.g. array.astype('" + d.dtype + "'))");
    }
    if (t.data.size() != d.nbytes()) {
      throw input_error("input '" + d.name + "' (" + d.dtype + shape_str(d.shape) + ") holds " +
                        std::to_string(t.data.size()) + " bytes of data, expected " + std::to_string(d.nbytes()));
    }
  }

  using clock = std::chrono::steady_clock;
  TensorMap result;
  std::vector<double> times;
  try {
    const Runtime& rt = Runtime::get();
    std::vector<ffi::Tensor> current;
    const Device& first = impl_->stages.front().device;
    for (const TensorDesc& d : m.inputs) {
      ffi::Tensor t = alloc_tensor(d.shape, d.dtype, first);
      const HostTensor& h = inputs.at(d.name);
      if (!h.data.empty()) {
        rt.copy_from_bytes(t, static_cast<void*>(const_cast<uint8_t*>(h.data.data())), static_cast<int64_t>(h.data.size()));
      }
      current.push_back(std::move(t));
    }
    Device prev = first;
    for (std::size_t s = 0; s < impl_->stages.size(); ++s) {
      LoadedStage& st = impl_->stages[s];
      auto t0 = clock::now();
      if (!same_device(prev, st.device)) {
        for (ffi::Tensor& t : current) {
          std::vector<int64_t> shape(t.shape().begin(), t.shape().end());
          ffi::Tensor moved = rt.alloc(ffi::Shape(shape), t.dtype(), to_dl(st.device), ffi::Optional<ffi::String>())
                                  .cast<ffi::Tensor>();
          rt.copy_from_to(t, moved);
          t = std::move(moved);
        }
        sync(prev);
        sync(st.device);
      }
      std::vector<ffi::AnyView> args;
      args.reserve(current.size() + st.params.size());
      for (const ffi::Tensor& t : current) args.emplace_back(t);
      for (const ffi::Tensor& t : st.params) args.emplace_back(t);
      ffi::Any out;
      st.fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &out);
      std::vector<ffi::Tensor> next;
      if (auto single = out.as<ffi::Tensor>()) {
        next.push_back(*single);
      } else if (auto arr = out.try_cast<ffi::Array<ffi::Any>>()) {
        for (const ffi::Any& item : *arr) {
          auto t = item.as<ffi::Tensor>();
          if (!t.has_value()) {
            throw runtime_error("stage " + std::to_string(s) + " (" + st.library.string() +
                                ") returned a non-tensor value; recompile the model");
          }
          next.push_back(*t);
        }
      } else {
        throw runtime_error("stage " + std::to_string(s) + " (" + st.library.string() + ") returned " +
                            out.GetTypeKey() + ", expected a tensor or a tuple of tensors");
      }
      if (next.size() != st.outputs.size()) {
        throw runtime_error("stage " + std::to_string(s) + " returned " + std::to_string(next.size()) +
                            " tensors, the manifest lists " + std::to_string(st.outputs.size()) + " outputs");
      }
      for (std::size_t o = 0; o < next.size(); ++o) {
        std::vector<int64_t> shape(next[o].shape().begin(), next[o].shape().end());
        if (shape != st.outputs[o].shape) {
          throw runtime_error("stage " + std::to_string(s) + " output '" + st.outputs[o].name + "' has shape " +
                              shape_str(shape) + ", the manifest says " + shape_str(st.outputs[o].shape));
        }
      }
      sync(st.device);
      times.push_back(std::chrono::duration<double>(clock::now() - t0).count());
      current = std::move(next);
      prev = st.device;
    }
    for (std::size_t o = 0; o < m.outputs.size(); ++o) {
      const TensorDesc& d = m.outputs[o];
      HostTensor h;
      h.dtype = d.dtype;
      h.shape = d.shape;
      h.data.resize(d.nbytes());
      if (!h.data.empty()) {
        rt.copy_to_bytes(current[o], static_cast<void*>(h.data.data()), static_cast<int64_t>(h.data.size()));
      }
      result.emplace(d.name, std::move(h));
    }
  } catch (const Error&) {
    throw;
  } catch (const std::exception& e) {
    throw runtime_error("running " + m.path.parent_path().string() + " failed in TVM: " + tvm_message(e));
  }
  impl_->last_stage_seconds = std::move(times);
  return result;
}

}  // namespace cachefit
