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

// Separable crops of a 3D (Z, Y, X) array (a 2D image is one with Z = 1): crop k is
//   out[k, p0, p1, p2] = sum_{t0, t1, t2} w0[k, p0, t0] w1[k, p1, t1] w2[k, p2, t2]
//                        * x[clamp(f0[k, p0] + t0), clamp(f1[k, p1] + t1), clamp(f2[k, p2] + t2)]
// with every index clamped to its axis (edge samples repeated).
struct CropMap {
  int64_t num_crops = 0;
  int64_t size[3] = {1, 1, 1};   // input (Z, Y, X)
  int64_t crop[3] = {1, 1, 1};   // output (P0, P1, P2)
  int64_t taps[3] = {1, 1, 1};   // T0, T1, T2
  const int64_t* first[3] = {};  // (K, P_d) first input sample per output sample
  const float* weights[3] = {};  // (K, P_d, T_d) row-major
};

// One axis' linear map from input samples to a stage grid sampled at positions q (the
// stage image is the input smoothed by `kernel` and sampled at j * ratio; a position
// between stage samples interpolates linearly; zero outside the stage grid), in the
// compact form of AxisMap: for each position, first input sample and `taps` weights,
//   taps = ceil(ratio) + 2 + (kernel_len - 1).
struct StageRows {
  int64_t n_in = 0;
  int64_t n_out = 0;
  double ratio = 1.0;
  const double* kernel = nullptr;  // (kernel_len,), odd length, centre tap in the middle
  int64_t kernel_len = 1;
  int64_t taps() const;
};

// For n positions q: first[i] and weights[i * taps .. (i + 1) * taps).
void stage_rows_cpu(const StageRows& rows, const double* q, int64_t n, int64_t* first,
                    float* weights);

// Both kernels below run on at most `threads` threads (the calling one included; 0: one
// per hardware thread), fewer when the work is small.

// Writes the (K, P0, P1, P2) float32 crops into `out` (C-contiguous); threads over crops.
void crop_cpu(const CropMap& map, const void* x, ElementType type, float* out, int threads);

// Writes the (lead, n_out, trail) float32 result into `out` (C-contiguous). Accumulates
// in float32, in a fixed order per output sample, so the result does not depend on the
// number of threads. Runs on a pool of std::threads.
void resample_axis_cpu(const AxisMap& map, const void* x, ElementType type, float* out,
                       int threads);

}  // namespace fastlmk
