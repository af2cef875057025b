// The test-only extension's entry points (tests/emulated_cuda.py builds it):
// the CUDA glue and kernels, compiled for the emulated GPU, registered for
// fused_bn's ops on CPU tensors while enabled, and the emulated device's
// settings. Enabling overrides fused_bn's own CPU kernels (the dispatcher
// warns once); disabling drops the registration and restores them.
#include <torch/library.h>

#include <memory>
#include <mutex>
#include <string>

#include "cuda_emulation.h"

namespace fused_bn {
void register_cuda_glue(torch::Library& m);

namespace emulation {
namespace {

std::mutex registration_mutex;
std::unique_ptr<torch::Library> registration;

void enable(bool on) {
  std::lock_guard<std::mutex> lock(registration_mutex);
  if (on && !registration) {
    registration = std::make_unique<torch::Library>(torch::Library::IMPL, "fused_bn", c10::DispatchKey::CPU,
                                                    __FILE__, __LINE__);
    register_cuda_glue(*registration);
  } else if (!on) {
    registration.reset();
  }
}

bool enabled() {
  std::lock_guard<std::mutex> lock(registration_mutex);
  return registration != nullptr;
}

void configure(int64_t multiprocessor_count, int64_t block_order, int64_t seed, int64_t resident_threads) {
  TORCH_CHECK(multiprocessor_count >= 1, "emulated GPU: multiprocessor_count must be positive");
  TORCH_CHECK(resident_threads >= 32 && resident_threads <= 2048,
              "emulated GPU: resident_threads is 32..2048 per multiprocessor");
  TORCH_CHECK(block_order >= 0 && block_order <= 2, "emulated GPU: block_order is 0 (forward), 1 (reverse) or 2 (shuffle)");
  DeviceConfig c;
  c.multiprocessor_count = static_cast<int>(multiprocessor_count);
  c.order = static_cast<BlockOrder>(block_order);
  c.seed = static_cast<uint64_t>(seed);
  c.resident_threads_per_multiprocessor = static_cast<int>(resident_threads);
  set_config(c);
}

int64_t launches() { return launch_count(); }

// Global-memory traffic accounting (cuda_emulation.h): traffic(true) starts
// recording (clearing what was recorded), traffic(false) stops;
// traffic_take() returns the recorded launches as JSON and forgets them.
void traffic(bool on, int64_t every_kth_block) { set_traffic_recording(on, every_kth_block); }
std::string traffic_take() { return take_traffic_json(); }

}  // namespace
}  // namespace emulation
}  // namespace fused_bn

TORCH_LIBRARY(fused_bn_emulation, m) {
  m.def("enable(bool on) -> ()", &fused_bn::emulation::enable);
  m.def("enabled() -> bool", &fused_bn::emulation::enabled);
  m.def("configure(int multiprocessor_count, int block_order, int seed, int resident_threads=1024) -> ()", &fused_bn::emulation::configure);
  m.def("launch_count() -> int", &fused_bn::emulation::launches);
  m.def("traffic(bool on, int every_kth_block=1) -> ()", &fused_bn::emulation::traffic);
  m.def("traffic_take() -> str", &fused_bn::emulation::traffic_take);
}
