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
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
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

// Thrown by Pipeline::load (kind kArtifact) for an llvm artifact whose code uses instruction-set
// extensions (the manifest's target.cpu_features) that the host CPU lacks: its code would die of an
// illegal instruction (SIGILL). Nothing of the artifact has been loaded when it is thrown.
class CpuFeatureError : public Error {
 public:
  CpuFeatureError(const std::string& message, std::string mcpu, std::string host_model, std::vector<std::string> missing)
      : Error(Kind::kArtifact, message), mcpu_(std::move(mcpu)), host_model_(std::move(host_model)),
        missing_(std::move(missing)) {}
  const std::string& mcpu() const { return mcpu_; }          // the artifact's target.mcpu ("" when null)
  const std::string& host_model() const { return host_model_; }  // the host's "model name" in /proc/cpuinfo
  const std::vector<std::string>& missing() const { return missing_; }  // LLVM feature names, manifest order

 private:
  std::string mcpu_, host_model_;
  std::vector<std::string> missing_;
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
  // The host CPU check (see check_cpu_features): a file in /proc/cpuinfo format to take the host's
  // CPU model and flags from. Empty: $CACHEFIT_CPUINFO when set (tests use it to fake a host), else
  // /proc/cpuinfo on Linux; on other systems the check is skipped with a warning. A named file that
  // cannot be read is an Error; a file without a "flags" line skips the check with a warning.
  std::string cpuinfo;
  // Receives the runtime's warnings (one line each); default: "cachefit: warning: ..." on stderr.
  std::function<void(const std::string&)> warn;
};

// Per-stage and end-to-end timing summary of repeated runs, in seconds.
struct TimeSummary {
  double mean = 0, median = 0, min = 0, max = 0;
  static TimeSummary of(std::vector<double> samples);
};

// The loaded stages of an artifact. Movable, not copyable; not thread-safe (one run at a time).
class Pipeline {
 public:
  // Reads manifest.json, refuses a newer format version, verifies every stage file's sha256 and (llvm
  // artifacts) that the host CPU has the manifest's target.cpu_features (CpuFeatureError) before
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

// --- host CPU check -------------------------------------------------------------------------------

// The host's CPU as /proc/cpuinfo describes its first processor.
struct HostCpu {
  std::string model_name = "unknown CPU";  // the first "model name" line
  std::set<std::string> flags;             // the first "flags" line, split on whitespace
};

// Reads a /proc/cpuinfo-format file into *host; false when it cannot be opened or has no "flags" line
// (as on non-x86 Linux hosts).
bool read_cpuinfo(const std::string& path, HostCpu* host);

// LLVM feature name (the manifest's target.cpu_features) -> Linux /proc/cpuinfo flag ("avx512vnni" ->
// "avx512_vnni"). This table mirrors cachefit.runtime.loader.CPUINFO_FLAGS, which is the source: change
// that one and this one together (tests/test_cpp_runtime.py compares them via cachefit-run
// --print-cpu-flag-map). Features not in the table are not checked, as in Python.
const std::vector<std::pair<std::string, std::string>>& cpuinfo_flag_map();

// The check Pipeline::load applies after verifying checksums and before loading any library: throws
// CpuFeatureError, naming `mcpu`, the host's model name and the missing features, when `host` lacks
// the flag of one of `cpu_features`. `artifact` names the artifact in the message.
void check_cpu_features(const std::string& artifact, const std::string& mcpu,
                        const std::vector<std::string>& cpu_features, const HostCpu& host);

// Lowercase hex SHA-256 (FIPS 180-4) of a buffer and of a file's bytes (Error naming the file when
// it cannot be read).
std::string sha256_hex(const void* data, std::size_t size);
std::string sha256_file(const std::string& path);

}  // namespace cachefit

#endif  // CACHEFIT_RUNTIME_H_
