// cachefit-run: run a compiled artifact directory from the command line (the C++ twin of `cachefit run`).
//
//   cachefit-run ARTIFACT_DIR -i inputs.npz [-o outputs.npz] [--devices cpu|cuda:0,cuda:1,...]
//                [--repeat N --print-time] [--no-print-outputs]
//   cachefit-run --print-cpu-flag-map     (the LLVM feature -> /proc/cpuinfo flag table of the CPU check)
//
// Before loading any stage library, an llvm artifact's target.cpu_features are checked against the host's
// /proc/cpuinfo flags (or the file named by $CACHEFIT_CPUINFO); a CPU that lacks one is refused (exit 2).
//
// Exit status: 0 on success, 2 for errors in the artifact, the inputs or the command line (one line on
// stderr starting with "cachefit-run: error:"), 1 for unexpected failures.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "cachefit_runtime.h"
#include "npz.h"

namespace {

const char* kUsage =
    "usage: cachefit-run ARTIFACT_DIR -i INPUTS.npz [-o OUTPUTS.npz] [--devices LIST]\n"
    "                    [--repeat N] [--print-time] [--no-print-outputs]\n"
    "\n"
    "Run a cachefit artifact directory (from `cachefit compile`): every stage in order, each on its device.\n"
    "\n"
    "  -i, --inputs FILE       the model inputs as an .npz file (one array per input name, np.savez)\n"
    "  -o, --outputs FILE      write the outputs to this .npz file\n"
    "  --devices LIST          comma-separated device per stage (cpu, cuda:0, ...), or one for all stages\n"
    "  --repeat N              runs to time with --print-time (default 1)\n"
    "  --print-time            print per-stage and total run times (ms)\n"
    "  --no-print-outputs      do not print each output's shape, dtype and first values\n"
    "  --print-cpu-flag-map    print the LLVM feature -> /proc/cpuinfo flag table of the host CPU check, exit\n"
    "  -h, --help              show this help\n"
    "\n"
    "An llvm artifact is refused (exit 2) when this host's CPU lacks a feature in its manifest's\n"
    "target.cpu_features. CACHEFIT_CPUINFO=FILE takes the host CPU from FILE (/proc/cpuinfo format).\n";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Args {
  std::string artifact, inputs, outputs, devices;
  int repeat = 1;
  bool print_time = false, print_outputs = true, print_cpu_flag_map = false;
};

Args parse_args(int argc, char** argv) {
  Args a;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    std::string value;
    bool has_inline = false;
    if (arg.rfind("--", 0) == 0 && arg.find('=') != std::string::npos) {
      value = arg.substr(arg.find('=') + 1);
      arg = arg.substr(0, arg.find('='));
      has_inline = true;
    }
    auto next = [&]() -> std::string {
      if (has_inline) return value;
      if (i + 1 >= argc) throw UsageError("option " + arg + " needs a value");
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      std::exit(0);
    } else if (arg == "-i" || arg == "--inputs") {
      a.inputs = next();
    } else if (arg == "-o" || arg == "--outputs") {
      a.outputs = next();
    } else if (arg == "--devices") {
      a.devices = next();
    } else if (arg == "--repeat") {
      std::string v = next();
      char* end = nullptr;
      long n = std::strtol(v.c_str(), &end, 10);
      if (v.empty() || *end != '\0' || n < 1 || n > 1000000) {
        throw UsageError("--repeat " + v + ": give a whole number of runs, at least 1");
      }
      a.repeat = static_cast<int>(n);
    } else if (arg == "--print-time") {
      a.print_time = true;
    } else if (arg == "--no-print-outputs") {
      a.print_outputs = false;
    } else if (arg == "--print-outputs") {
      a.print_outputs = true;
    } else if (arg == "--print-cpu-flag-map") {
      a.print_cpu_flag_map = true;
    } else if (!arg.empty() && arg[0] == '-') {
      throw UsageError("unknown option " + arg);
    } else {
      positional.push_back(arg);
    }
  }
  if (a.print_cpu_flag_map) return a;
  if (positional.size() != 1) throw UsageError("give exactly one ARTIFACT_DIR");
  a.artifact = positional[0];
  if (a.inputs.empty()) throw UsageError("give the inputs with -i INPUTS.npz");
  return a;
}

std::vector<cachefit::Device> parse_devices(const std::string& text) {
  std::vector<cachefit::Device> out;
  std::size_t start = 0;
  while (start <= text.size()) {
    std::size_t comma = text.find(',', start);
    std::string part = text.substr(start, comma == std::string::npos ? std::string::npos : comma - start);
    if (part.find_first_not_of(" \t") != std::string::npos) out.push_back(cachefit::Device::parse(part));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  if (out.empty()) throw UsageError("--devices '" + text + "' names no device");
  return out;
}

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "[";
  for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

// The inputs of the .npz, by name. Raw void arrays (NumPy's view of bfloat16 / float8) take the
// model's dtype when the item size matches.
cachefit::TensorMap read_inputs(const std::string& path, const cachefit::Pipeline& pipe) {
  cachefit::TensorMap inputs;
  for (auto& [name, tensor] : cachefit::npz::load_npz(path)) {
    if (inputs.count(name)) {
      throw cachefit::Error(cachefit::Error::Kind::kInput, path + " holds array '" + name + "' twice");
    }
    if (tensor.dtype.rfind("void", 0) == 0) {
      for (const cachefit::TensorDesc& d : pipe.inputs()) {
        if (d.name == name && std::to_string(cachefit::dtype_size(d.dtype)) == tensor.dtype.substr(4)) {
          tensor.dtype = d.dtype;
        }
      }
    }
    inputs.emplace(name, std::move(tensor));
  }
  return inputs;
}

template <typename T, typename Format>
void append_values(std::string* s, const cachefit::HostTensor& t, Format format) {
  const int64_t n = t.numel();
  const T* p = t.data_as<T>();
  for (int64_t i = 0; i < n && i < 6; ++i) *s += (i ? ", " : "") + format(p[i]);
  if (n > 6) *s += ", ...";
}

// "name: dtype[shape] [first values]", as `cachefit run` prints it.
std::string summary(const std::string& name, const cachefit::HostTensor& t) {
  auto real = [](double v) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "%.6g", v);
    return std::string(buf);
  };
  auto integer = [](long long v) { return std::to_string(v); };
  std::string s = name + ": " + t.dtype + shape_str(t.shape) + " [";
  const std::string& d = t.dtype;
  if (d == "float32") append_values<float>(&s, t, real);
  else if (d == "float64") append_values<double>(&s, t, real);
  else if (d == "int64") append_values<int64_t>(&s, t, integer);
  else if (d == "int32") append_values<int32_t>(&s, t, integer);
  else if (d == "uint8") append_values<uint8_t>(&s, t, integer);
  else if (d == "bool") append_values<uint8_t>(&s, t, [](long long v) { return std::string(v ? "True" : "False"); });
  else s += "...";
  return s + "]";
}

void print_times(const std::vector<cachefit::TimeSummary>& stages, const cachefit::TimeSummary& total,
                 const cachefit::Pipeline& pipe, int repeat) {
  std::printf("%-10s%10s%11s%10s%10s   (%d runs)\n", "", "mean ms", "median ms", "min ms", "max ms", repeat);
  auto row = [](const std::string& name, const cachefit::TimeSummary& s) {
    std::printf("%-10s%10.3f%11.3f%10.3f%10.3f\n", name.c_str(), s.mean * 1e3, s.median * 1e3, s.min * 1e3,
                s.max * 1e3);
  };
  for (std::size_t i = 0; i < stages.size(); ++i) row(pipe.stage_name(i), stages[i]);
  row("total", total);
}

int run(const Args& args) {
  if (args.print_cpu_flag_map) {
    for (const auto& [llvm_name, flag] : cachefit::cpuinfo_flag_map()) std::printf("%s %s\n", llvm_name.c_str(), flag.c_str());
    return 0;
  }
  cachefit::LoadOptions options;
  if (!args.devices.empty()) options.devices = parse_devices(args.devices);
  cachefit::Pipeline pipe = cachefit::Pipeline::load(args.artifact, options);
  cachefit::TensorMap inputs = read_inputs(args.inputs, pipe);
  cachefit::TensorMap outputs = pipe.run(inputs);

  if (!args.outputs.empty()) {
    std::vector<std::pair<std::string, const cachefit::HostTensor*>> ordered;
    for (const cachefit::TensorDesc& d : pipe.outputs()) ordered.emplace_back(d.name, &outputs.at(d.name));
    cachefit::npz::save_npz(args.outputs, ordered);
  }
  if (args.print_outputs) {
    for (const cachefit::TensorDesc& d : pipe.outputs()) std::printf("%s\n", summary(d.name, outputs.at(d.name)).c_str());
  }
  if (args.print_time) {
    using clock = std::chrono::steady_clock;
    std::vector<std::vector<double>> per_stage(pipe.num_stages());
    std::vector<double> totals;
    for (int r = 0; r < args.repeat; ++r) {
      auto t0 = clock::now();
      pipe.run(inputs);
      totals.push_back(std::chrono::duration<double>(clock::now() - t0).count());
      const std::vector<double>& st = pipe.last_stage_seconds();
      for (std::size_t i = 0; i < st.size() && i < per_stage.size(); ++i) per_stage[i].push_back(st[i]);
    }
    std::vector<cachefit::TimeSummary> stages;
    for (auto& xs : per_stage) stages.push_back(cachefit::TimeSummary::of(xs));
    print_times(stages, cachefit::TimeSummary::of(totals), pipe, args.repeat);
  }
  std::fflush(stdout);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse_args(argc, argv));
  } catch (const UsageError& e) {
    std::fprintf(stderr, "%scachefit-run: error: %s\n", kUsage, e.what());
    return 2;
  } catch (const cachefit::Error& e) {
    std::fprintf(stderr, "cachefit-run: error: %s\n", e.what());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "cachefit-run: internal error: %s\n", e.what());
    return 1;
  } catch (...) {
    std::fprintf(stderr, "cachefit-run: internal error (unknown exception)\n");
    return 1;
  }
}
