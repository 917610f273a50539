// Separable resampling of one array axis by a short linear map per output sample.
#pragma once

#include <cstdint>

namespace fastlmk {

// One axis of a C-contiguous (lead, n_in, trail) array mapped to (lead, n_out, trail):
//   out[l, j, c] = sum_{t < taps} weights[j, t] * x[l, clamp(first[j] + t, 0, n_in - 1), c]
// Clamping repeats the edge samples, as the smoothing reference does at the image ends.
struct AxisMap {
  int64_t lead = 1;
  int64_t n_in = 0;
  int64_t trail = 1;
  int64_t n_out = 0;
  int64_t taps = 0;
  const int64_t* first = nullptr;  // (n_out,) first input sample of each output sample
  const float* weights = nullptr;  // (n_out, taps) row-major
};

// Element types the kernel reads directly (no float copy of the input first).
enum class ElementType : int { kUInt8, kInt8, kUInt16, kInt16, kInt32, kFloat32, kFloat64 };

// Writes the (lead, n_out, trail) float32 result into `out` (C-contiguous). Accumulates
// in float32, in a fixed order per output sample, so the result does not depend on the
// number of threads. Runs on a pool of std::threads.
void resample_axis_cpu(const AxisMap& map, const void* x, ElementType type, float* out);

}  // namespace fastlmk
