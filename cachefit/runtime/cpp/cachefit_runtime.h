// cachefit C++ runtime: load a compiled artifact directory (docs/artifact-format.md) and run its
// stages in order, each on its own device, with the outputs of stage i copied to stage i+1's device.
//
//   cachefit::Pipeline pipe = cachefit::Pipeline::load("build/");       // checks sha256 first
//   cachefit::TensorMap out = pipe.run({{"x", cachefit::HostTensor::from_vector<float>({2, 4}, xs)}});
//   const float* y = out.at("y").data_as<float>();
//
// The public interface uses the standard library only; TVM (tvm-ffi headers, libtvm_runtime and
// libtvm_ffi from the apache-tvm wheel) is needed to build and link, not to include this header.
#ifndef CACHEFIT_RUNTIME_H_
#define CACHEFIT_RUNTIME_H_

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace cachefit {

// The newest artifact format version this runtime reads; a newer manifest is refused.
constexpr int kFormatVersion = 1;

// Every error the runtime reports: the message names the file or tensor, the numbers and a way out.
class Error : public std::runtime_error {
 public:
  enum class Kind {
    kArtifact,  // the artifact directory is incomplete, tampered with, malformed or of a newer format
    kInput,     // run-time input that does not match the artifact (name, shape, dtype)
    kDevice,    // a device that is missing or whose runtime cannot be loaded
    kRuntime,   // a failure inside TVM while loading or running a stage
  };
  Error(Kind kind, const std::string& message) : std::runtime_error(message), kind_(kind) {}
  Kind kind() const { return kind_; }

 private:
  Kind kind_;
};

// Bytes per element of a TVM dtype name ("float32" -> 4, "bool" -> 1); throws Error for others.
// Supported: float64 float32 float16 bfloat16 int64 int32 int16 int8 uint64 uint32 uint16 uint8
// bool float8_e4m3fn float8_e5m2.
std::size_t dtype_size(const std::string& dtype);

// A tensor as the manifest describes it.
struct TensorDesc {
  std::string name;
  std::vector<int64_t> shape;
  std::string dtype;  // TVM dtype name
  int64_t numel() const;
  std::size_t nbytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype); }
};

// A dense row-major (C-order), little-endian array in host memory.
struct HostTensor {
  std::string dtype;  // TVM dtype name ("float32", "int64", ...)
  std::vector<int64_t> shape;
  std::vector<uint8_t> data;  // numel() * dtype_size(dtype) bytes

  int64_t numel() const;
  template <typename T>
  const T* data_as() const { return reinterpret_cast<const T*>(data.data()); }
  template <typename T>
  T* data_as() { return reinterpret_cast<T*>(data.data()); }
  // A tensor holding a copy of `values` (T must match dtype's element size).
  template <typename T>
  static HostTensor from_vector(const std::string& dtype, std::vector<int64_t> shape, const std::vector<T>& values) {
    HostTensor t;
    t.dtype = dtype;
    t.shape = std::move(shape);
    t.data.resize(values.size() * sizeof(T));
    if (!values.empty()) std::memcpy(t.data.data(), values.data(), t.data.size());
    return t;
  }
};

using TensorMap = std::map<std::string, HostTensor>;

// A device: CPU or CUDA device `index`.
struct Device {
  enum class Kind { kCPU, kCUDA };
  Kind kind = Kind::kCPU;
  int index = 0;
  // "cpu", "cpu:0", "cuda", "cuda:1", "gpu:1"; throws Error for anything else.
  static Device parse(const std::string& text);
  std::string str() const;
};

struct LoadOptions {
  // Empty: each stage on its manifest device (cuda:i for GPU stage i, cpu:0 for CPU stages).
  // One entry: every stage on that device. Otherwise one device per stage.
  std::vector<Device> devices;
};

// Per-stage and end-to-end timing summary of repeated runs, in seconds.
struct TimeSummary {
  double mean = 0, median = 0, min = 0, max = 0;
  static TimeSummary of(std::vector<double> samples);
};

// The loaded stages of an artifact. Movable, not copyable; not thread-safe (one run at a time).
class Pipeline {
 public:
  // Reads manifest.json, refuses a newer format version, verifies every stage file's sha256 before
  // loading any native code, then loads each stage's library and weights on its device.
  static Pipeline load(const std::string& artifact_dir, const LoadOptions& options = LoadOptions());

  Pipeline(Pipeline&&) noexcept;
  Pipeline& operator=(Pipeline&&) noexcept;
  ~Pipeline();

  // Runs every stage in order on the model inputs (by name, as in inputs()); returns the model
  // outputs by name, copied back to host memory. Throws Error(kInput) for a missing or unknown
  // input or a wrong shape or dtype.
  TensorMap run(const TensorMap& inputs);

  const std::vector<TensorDesc>& inputs() const;
  const std::vector<TensorDesc>& outputs() const;
  std::size_t num_stages() const;
  const std::string& stage_name(std::size_t i) const;
  Device stage_device(std::size_t i) const;
  // Wall time of each stage in the last run() (copy into the stage, call, device sync), seconds.
  const std::vector<double>& last_stage_seconds() const;
  // The artifact's target kind ("llvm" or "cuda") and model name, as in the manifest.
  const std::string& target_kind() const;
  const std::string& model_name() const;

 private:
  struct Impl;
  explicit Pipeline(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Lowercase hex SHA-256 (FIPS 180-4) of a buffer and of a file's bytes (Error naming the file when
// it cannot be read).
std::string sha256_hex(const void* data, std::size_t size);
std::string sha256_file(const std::string& path);

}  // namespace cachefit

#endif  // CACHEFIT_RUNTIME_H_
