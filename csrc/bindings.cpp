// The only C++ <-> Python seam: one line per launcher. Addresses, sizes and streams are plain integers (ops.h), so
// pybind11 needs no glue and the module never links against torch.
#include <pybind11/pybind11.h>

#include "images.h"
#include "ops.h"

#ifndef IVE_CUDA_ARCHS
#define IVE_CUDA_ARCHS ""
#endif

PYBIND11_MODULE(_C, m) {
  m.doc() = "internvl-engine kernels: CPU (OpenMP) launchers in _C.cpu, CUDA launchers in _C.cuda when built";
  auto cpu = m.def_submodule("cpu", "CPU implementations (OpenMP)");
  cpu.def("rms_norm", &ive::cpu::rms_norm);
  cpu.def("layer_norm", &ive::cpu::layer_norm);
  cpu.def("pixel_shuffle", &ive::cpu::pixel_shuffle);
  cpu.def("rotary", &ive::cpu::rotary);
  cpu.def("write_kv_cache", &ive::cpu::write_kv_cache);
  cpu.def("flash_attention", &ive::cpu::flash_attention);
  cpu.def("paged_attention", &ive::cpu::paged_attention);
  cpu.def("fused_moe", &ive::cpu::fused_moe);
  auto images = m.def_submodule("images", "host image preprocessing (OpenMP); releases the GIL");
  images.def("resize_u8", &ive::images::resize_u8, pybind11::call_guard<pybind11::gil_scoped_release>());
  images.def("tiles_normalize", &ive::images::tiles_normalize, pybind11::call_guard<pybind11::gil_scoped_release>());
#ifdef IVE_WITH_CUDA
  auto cuda = m.def_submodule("cuda", "CUDA kernels; every launcher takes the stream as its last argument");
  cuda.def("rms_norm", &ive::cuda::rms_norm);
  cuda.def("layer_norm", &ive::cuda::layer_norm);
  cuda.def("pixel_shuffle", &ive::cuda::pixel_shuffle);
  cuda.def("rotary", &ive::cuda::rotary);
  cuda.def("write_kv_cache", &ive::cuda::write_kv_cache);
  cuda.def("flash_attention", &ive::cuda::flash_attention);
  cuda.def("paged_attention", &ive::cuda::paged_attention);
  m.attr("CUDA_KERNELS") = true;
#else
  m.attr("CUDA_KERNELS") = false;
#endif
  m.attr("PAGED_SPLIT_TOKENS") = ive::kPagedSplitTokens;
  pybind11::list archs;
  for (const char* a = IVE_CUDA_ARCHS; *a;) {  // "sm_80;sm_90a" -> ["sm_80", "sm_90a"]
    const char* end = a;
    while (*end && *end != ';') ++end;
    if (end > a) archs.append(std::string(a, end));
    a = *end ? end + 1 : end;
  }
  m.attr("CUDA_ARCHS") = archs;
}
