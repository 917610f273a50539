// Probability-weighted landmark vote on a CUDA device.
#pragma once

#include <cstdint>

#include "../cpu/vote_cpu.h"

namespace fastlmk {

// Same contract as vote_cpu. `prob`, `disp` and `out` are device pointers on
// CUDA device `device`; the work is enqueued on `stream` (a cudaStream_t) and
// the call returns without waiting for it. Throws std::runtime_error carrying
// cudaGetErrorString's text when a CUDA call fails.
void vote_cuda(const VoteProblem& problem, const float* prob, const float* disp, double* out,
               int device, std::uintptr_t stream);

// Number of visible CUDA devices; 0 when there is no driver or no device.
int cuda_device_count() noexcept;

}  // namespace fastlmk
