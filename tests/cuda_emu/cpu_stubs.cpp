// The emulated module links bindings.cpp for its CUDA entry points; its CPU entry points are not
// exercised through it, so they are stubs here (the real CPU kernels are tested on their own).
#include <stdexcept>

#include "vqk/vqk.h"

namespace vqk {
void cpu_residual_forward(const ResidualArgs&, int) {
  throw std::runtime_error("cpu_residual_forward is not part of the emulated CUDA module");
}
void cpu_residual_backward(const ResidualBackwardArgs&, int) {
  throw std::runtime_error("cpu_residual_backward is not part of the emulated CUDA module");
}
void cpu_residual_stats(const ResidualStatsArgs&, int) {
  throw std::runtime_error("cpu_residual_stats is not part of the emulated CUDA module");
}
void cpu_grouped_forward(const GroupedArgs&, int) {
  throw std::runtime_error("cpu_grouped_forward is not part of the emulated CUDA module");
}
void cpu_grouped_backward(const GroupedBackwardArgs&, int) {
  throw std::runtime_error("cpu_grouped_backward is not part of the emulated CUDA module");
}
void cpu_forward(const ForwardArgs&, int) {
  throw std::runtime_error("cpu_forward is not part of the emulated CUDA module");
}
void cpu_backward(const BackwardArgs&, int) {
  throw std::runtime_error("cpu_backward is not part of the emulated CUDA module");
}
const char* cpu_isa() { return "none (emulated CUDA module)"; }
int64_t cpu_exact_rows() { return 0; }
int64_t cpu_set_aside_rows() { return 0; }
int64_t cpu_int8_rows() { return 0; }
bool cpu_use_openmp(const char*, bool) { return false; }
const char* cpu_pool() { return "own"; }
}  // namespace vqk

// Rows the forward's fast pass flagged for the exact re-search (cuda_emu.h; the tests read it).
extern "C" {
__attribute__((visibility("default"))) unsigned long long vqk_emu_flagged_rows = 0;
}
