// run_model: run a TorchScript model that calls torch.ops.mlstm ops, with no Python.
//
//   run_model <libmlstm_ext.so> <model.pt> [cpu|cuda] [--input x.pt] [--output y.pt]
//
// 1. dlopen the op library (mlstm_ext.library_path()): its static initialisers run the
//    TORCH_LIBRARY(mlstm, ...) registration into this process's dispatcher.
// 2. torch::jit::load the scripted model (its graph refers to the mlstm:: ops by name,
//    so the op must be registered before loading).
// 3. Run it on one input, print the output's shape and checksum, optionally save the output.
//
// The input is read from --input (a tensor written by Python's torch.save) or, without it, made
// here: torch::randn(2, 2 * chunk_size, d_model) after torch::manual_seed(0).
// --output writes the output (on the CPU) with torch::pickle_save; Python reads it with torch.load.
#include <torch/script.h>
#include <torch/cuda.h>

#include <dlfcn.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

static std::vector<char> read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr,
                 "usage: %s <op_library.so> <model.pt> [cpu|cuda] [--input x.pt] [--output y.pt]\n",
                 argv[0]);
    return 2;
  }
  std::string lib = argv[1], model_path = argv[2], device_name = "cpu", input_path, output_path;
  for (int a = 3; a < argc; ++a) {
    std::string s = argv[a];
    if (s == "--input" && a + 1 < argc) {
      input_path = argv[++a];
    } else if (s == "--output" && a + 1 < argc) {
      output_path = argv[++a];
    } else if (s == "cpu" || s == "cuda") {
      device_name = s;
    } else {
      std::fprintf(stderr, "unknown argument: %s\n", s.c_str());
      return 2;
    }
  }

  // RTLD_NOW: resolve every symbol now (a missing one fails here, not mid-run).
  // RTLD_GLOBAL: the usual choice for torch extension libraries (shared type info, the same as
  // torch.ops.load_library's ctypes.CDLL on Linux). The handle is never closed: the registrations
  // must outlive the model.
  if (!dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL)) {
    std::fprintf(stderr, "dlopen(%s) failed: %s\n", lib.c_str(), dlerror());
    return 1;
  }

  try {
    torch::Device device(torch::kCPU);
    if (device_name == "cuda") {
      if (!torch::cuda::is_available()) {
        std::fprintf(stderr, "cuda requested but torch::cuda::is_available() is false\n");
        return 3;
      }
      device = torch::Device(torch::kCUDA, 0);
    }

    torch::jit::Module model = torch::jit::load(model_path, device);
    model.eval();

    torch::Tensor x;
    if (!input_path.empty()) {
      x = torch::jit::pickle_load(read_file(input_path)).toTensor();
    } else {
      // The layer keeps its sizes as attributes (mlstm_ext.MLSTMLayer.d_model / .chunk_size).
      int64_t d_model = model.attr("d_model").toInt();
      int64_t chunk = model.attr("chunk_size").toInt();
      torch::manual_seed(0);
      x = torch::randn({2, 2 * chunk, d_model});
    }

    c10::InferenceMode guard;  // no autograd bookkeeping
    torch::Tensor y = model.forward({x.to(device)}).toTensor().to(torch::kCPU).contiguous();

    // Checksums in double, so they print the same as Python's y.double().sum().
    std::printf("device: %s\n", device_name.c_str());
    std::cout << "shape: " << y.sizes() << " dtype: " << y.dtype() << "\n";
    std::printf("sum: %.17g\nabs_sum: %.17g\n", y.to(torch::kDouble).sum().item<double>(),
                y.to(torch::kDouble).abs().sum().item<double>());

    if (!output_path.empty()) {
      std::vector<char> bytes = torch::jit::pickle_save(y);
      std::ofstream(output_path, std::ios::binary).write(bytes.data(), bytes.size());
      std::printf("wrote: %s\n", output_path.c_str());
    }
  } catch (const std::exception& e) {  // c10::Error derives from std::exception
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
