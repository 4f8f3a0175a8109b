// run_aoti: run an AOTInductor package (.pt2) whose model calls mlstm ops, with no Python.
//
//   run_aoti <libmlstm_ext.so> <model.pt2> [cpu|cuda] [--input x.pt] [--output y.pt] [--model NAME]
//
// 1. dlopen the op library (mlstm_ext.library_path()): its static initialisers run the
//    TORCH_LIBRARY(mlstm, ...) registration into this process's dispatcher. The compiled model
//    does not contain the op: its generated code hands each call of an mlstm op, described in
//    JSON inside the package, to libtorch's proxy executor, which looks the op up in the
//    dispatcher when the package is loaded. Hence: the library first, then the package.
// 2. Load the package with torch::inductor::AOTIModelPackageLoader (it unpacks the model's
//    compiled .so into a temporary folder and dlopens it).
// 3. Run it on the inputs, print each output's shape, dtype and checksums, optionally save them.
//
// Device: the package is compiled for one device type (its metadata's AOTI_DEVICE_KEY); by default
// the runner uses that one, and `cpu`/`cuda` on the command line must agree with it.
// Inputs: --input names a file written by Python's torch.save holding a tensor, or a tuple or
// list of tensors (the model's flat inputs, in order). Without it, the package's metadata must
// name the input shapes (key "input_shapes", e.g. "2,100,64" or "2,64;2,64" for two inputs):
// float32 torch::randn of each shape after torch::manual_seed(0).
// --output writes the outputs (moved to the CPU) with torch::pickle_save: the tensor itself when
// the model has one output, else a tuple of them; Python reads either with torch.load.
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/cuda.h>
#include <torch/script.h>

#include <dlfcn.h>

#include <cstdio>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

static std::vector<char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

static std::string shape_string(at::IntArrayRef sizes) {
  std::string s = "[";
  for (size_t d = 0; d < sizes.size(); ++d) s += (d ? ", " : "") + std::to_string(sizes[d]);
  return s + "]";
}

// "2,100,64;2,64" -> {{2, 100, 64}, {2, 64}}
static std::vector<std::vector<int64_t>> parse_shapes(const std::string& text) {
  std::vector<std::vector<int64_t>> shapes(1);
  std::string number;
  auto flush = [&]() {
    if (number.empty()) throw std::runtime_error("bad input_shapes metadata: '" + text + "'");
    shapes.back().push_back(std::stoll(number));
    number.clear();
  };
  for (char c : text) {
    if (c >= '0' && c <= '9') {
      number += c;
    } else if (c == ',') {
      flush();
    } else if (c == ';') {
      flush();
      shapes.emplace_back();
    } else if (c != ' ') {
      throw std::runtime_error("bad input_shapes metadata: '" + text + "'");
    }
  }
  flush();
  return shapes;
}

// A tensor, or a tuple / list of tensors, as the flat list of model inputs.
static std::vector<torch::Tensor> flat_tensors(const c10::IValue& v, const std::string& path) {
  if (v.isTensor()) return {v.toTensor()};
  std::vector<c10::IValue> items;
  if (v.isTuple()) {
    items = v.toTupleRef().elements().vec();
  } else if (v.isList()) {
    items = v.toListRef().vec();
  } else {
    throw std::runtime_error(path + " holds a " + v.tagKind() +
                             ", not a tensor or a tuple/list of tensors");
  }
  std::vector<torch::Tensor> out;
  for (size_t k = 0; k < items.size(); ++k) {
    if (!items[k].isTensor())
      throw std::runtime_error(path + ": item " + std::to_string(k) + " is a " +
                               items[k].tagKind() + ", not a tensor");
    out.push_back(items[k].toTensor());
  }
  return out;
}

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr,
                 "usage: %s <op_library.so> <model.pt2> [cpu|cuda] [--input x.pt] "
                 "[--output y.pt] [--model NAME]\n",
                 argv[0]);
    return 2;
  }
  std::string lib = argv[1], package = argv[2], device_name, input_path, output_path;
  std::string model_name = "model";  // aoti_compile_and_package's name for a single model
  for (int a = 3; a < argc; ++a) {
    std::string s = argv[a];
    if (s == "--input" && a + 1 < argc) {
      input_path = argv[++a];
    } else if (s == "--output" && a + 1 < argc) {
      output_path = argv[++a];
    } else if (s == "--model" && a + 1 < argc) {
      model_name = argv[++a];
    } else if (s == "cpu" || s == "cuda") {
      device_name = s;
    } else {
      std::fprintf(stderr, "unknown argument: %s\n", s.c_str());
      return 2;
    }
  }

  // As in run_model.cpp: RTLD_NOW resolves every symbol now (a library built against another
  // libtorch fails here, not mid-run); RTLD_GLOBAL as torch.ops.load_library does. The handle
  // stays open: the registrations must outlive the model.
  if (!dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL)) {
    std::fprintf(stderr, "dlopen(%s) failed: %s\n", lib.c_str(), dlerror());
    return 1;
  }

  try {
    // The metadata alone (no unpacking): the device the package was compiled for, and the
    // optional input shapes.
    std::unordered_map<std::string, std::string> meta =
        torch::inductor::AOTIModelPackageLoader::load_metadata_from_package(package, model_name);
    std::string package_device = meta.count("AOTI_DEVICE_KEY") ? meta["AOTI_DEVICE_KEY"] : "cpu";
    if (device_name.empty()) device_name = package_device;
    if (device_name != package_device) {
      std::fprintf(stderr,
                   "%s was compiled for %s, not %s: export and compile the model on %s tensors\n",
                   package.c_str(), package_device.c_str(), device_name.c_str(),
                   device_name.c_str());
      return 2;
    }
    torch::Device device(torch::kCPU);
    if (device_name == "cuda") {
      if (!torch::cuda::is_available()) {
        std::fprintf(stderr, "cuda requested but torch::cuda::is_available() is false\n");
        return 3;
      }
      device = torch::Device(torch::kCUDA, 0);
    } else if (device_name != "cpu") {
      std::fprintf(stderr, "%s: device %s is not supported by this runner\n", package.c_str(),
                   device_name.c_str());
      return 2;
    }

    // Unpacks the package and loads its compiled model; device_index -1: the current CUDA device.
    torch::inductor::AOTIModelPackageLoader loader(package, model_name);

    std::vector<torch::Tensor> inputs;
    if (!input_path.empty()) {
      inputs = flat_tensors(torch::jit::pickle_load(read_file(input_path)), input_path);
    } else if (meta.count("input_shapes")) {
      torch::manual_seed(0);
      for (const auto& shape : parse_shapes(meta["input_shapes"])) inputs.push_back(torch::randn(shape));
    } else {
      std::fprintf(stderr,
                   "no --input, and %s names no input_shapes in its metadata: pass --input FILE\n",
                   package.c_str());
      return 2;
    }
    for (auto& x : inputs) x = x.to(device);

    c10::InferenceMode guard;  // no autograd bookkeeping
    std::vector<torch::Tensor> outputs = loader.run(inputs);  // on the current CUDA stream
    for (auto& y : outputs) y = y.to(torch::kCPU).contiguous();

    std::printf("device: %s\n", device_name.c_str());
    std::printf("inputs: %zu\noutputs: %zu\n", inputs.size(), outputs.size());
    for (size_t k = 0; k < outputs.size(); ++k) {
      const torch::Tensor& y = outputs[k];
      torch::Tensor y64 = y.to(torch::kDouble);  // checksums in double, as Python's y.double().sum()
      std::string name = "y[" + std::to_string(k) + "]";
      std::printf("%s shape: %s dtype: %s\n", name.c_str(), shape_string(y.sizes()).c_str(),
                  std::string(y.dtype().name()).c_str());
      std::printf("%s sum: %.17g\n%s abs_sum: %.17g\n", name.c_str(), y64.sum().item<double>(),
                  name.c_str(), y64.abs().sum().item<double>());
    }

    if (!output_path.empty()) {
      c10::IValue saved;
      if (outputs.size() == 1) {
        saved = outputs[0];
      } else {
        std::vector<c10::IValue> items(outputs.begin(), outputs.end());
        saved = c10::ivalue::Tuple::create(std::move(items));
      }
      std::vector<char> bytes = torch::jit::pickle_save(saved);
      std::ofstream(output_path, std::ios::binary).write(bytes.data(), bytes.size());
      std::printf("wrote: %s\n", output_path.c_str());
    }
  } catch (const std::exception& e) {  // c10::Error derives from std::exception
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
