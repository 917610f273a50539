#include "vote_cuda.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace fastlmk {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// A block should own at least this many cells per thread of each landmark.
constexpr int kMinCellsPerThread = 4;
// Blocks per multiprocessor to aim for, over all landmarks (8 x 256 threads fill an SM).
constexpr int kBlocksPerSm = 8;
constexpr double kLn10 = 2.302585092994045684;

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("fastlmk: CUDA error '") + cudaGetErrorString(err) +
                             "' in " + what);
  }
}
#define FASTLMK_CUDA_CHECK(expr) check((expr), #expr)

// The module links its own static cudart, whose current device is separate from
// the one torch sets, so every call selects the device itself and restores it.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    FASTLMK_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) FASTLMK_CUDA_CHECK(cudaSetDevice(device));
    changed_ = previous_ != device;
  }
  ~DeviceGuard() {
    if (changed_) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
  bool changed_ = false;
};

struct KernelArgs {
  VoteProblem pb;
  uint32_t grid[3];  // 32-bit copies: cheaper index arithmetic
  uint32_t cells;
  const float* prob;
  const float* disp;
  double* out;  // (L, D + 2): accumulators during the passes, results after finalize
};

template <Transform T>
__device__ __forceinline__ double to_pixels(float t) {
  const double td = static_cast<double>(t);
  if constexpr (T == Transform::kLinear) {
    return td;
  } else {
    return copysign(exp(fabs(td) * kLn10) - 1.0, td);  // as on the CPU
  }
}

// Sums v[0..N) over the block; the result is valid in thread 0.
template <int N>
__device__ __forceinline__ void block_sum(double (&v)[N], double (&scratch)[N][kWarps]) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < N; ++k) {
    for (int offset = 16; offset > 0; offset >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
    if (lane == 0) scratch[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      v[k] = lane < kWarps ? scratch[k][lane] : 0.0;
      for (int offset = 16; offset > 0; offset >>= 1) v[k] += __shfl_down_sync(0xffffffffu, v[k], offset);
    }
  }
  __syncthreads();  // scratch is reused by the next landmark
}

// Pass 1 (kSpread = false): out[l] += (sum w v, sum w).
// Pass 2 (kSpread = true): out[l][D + 1] += sum w ||v - mean||^2, the mean taken
// from pass 1's sums; a second pass keeps the spread exact for tight clusters.
template <int D, Transform T, bool kSpread>
__global__ void __launch_bounds__(kThreads) vote_pass_kernel(const KernelArgs a) {
  constexpr int N = kSpread ? 1 : D + 1;
  __shared__ double scratch[N][kWarps];
  const VoteProblem& pb = a.pb;

  for (int64_t l = blockIdx.y; l < pb.num_landmarks; l += gridDim.y) {
    double* row = a.out + l * (D + 2);
    double mean[D];
    if constexpr (kSpread) {
      const double weight = row[D];
      if (!(weight > 0.0)) continue;  // uniform over the block
#pragma unroll
      for (int k = 0; k < D; ++k) mean[k] = row[k] / weight;
    }

    double acc[N];
#pragma unroll
    for (int k = 0; k < N; ++k) acc[k] = 0.0;

    const float* prob_l = a.prob + l * pb.prob_strides[0];
    const float* disp_l = a.disp + l * pb.disp_strides[0];
    for (uint32_t i = blockIdx.x * kThreads + threadIdx.x; i < a.cells; i += gridDim.x * kThreads) {
      uint32_t idx[D];
      uint32_t rest = i;
#pragma unroll
      for (int k = D - 1; k > 0; --k) {
        idx[k] = rest % a.grid[k];
        rest /= a.grid[k];
      }
      idx[0] = rest;
      int64_t p_off = 0, d_off = 0;
#pragma unroll
      for (int k = 0; k < D; ++k) {
        p_off += static_cast<int64_t>(idx[k]) * pb.prob_strides[k + 1];
        d_off += static_cast<int64_t>(idx[k]) * pb.disp_strides[k + 2];
      }
      const double w = static_cast<double>(__ldg(prob_l + p_off));
      // `!(w > 0)` also drops NaN probabilities.
      if (!(w > 0.0) || w < pb.min_prob) continue;
      double v[D];
#pragma unroll
      for (int k = 0; k < D; ++k) {
        v[k] = pb.origin[k] + static_cast<double>(idx[k]) * pb.stride[k] +
               to_pixels<T>(__ldg(disp_l + d_off + k * pb.disp_strides[1]));
      }
      if constexpr (kSpread) {
        double r2 = 0.0;
#pragma unroll
        for (int k = 0; k < D; ++k) r2 += (v[k] - mean[k]) * (v[k] - mean[k]);
        acc[0] += w * r2;
      } else {
#pragma unroll
        for (int k = 0; k < D; ++k) acc[k] += w * v[k];
        acc[D] += w;
      }
    }

    block_sum<N>(acc, scratch);
    if (threadIdx.x == 0) {
      if constexpr (kSpread) {
        atomicAdd(row + D + 1, acc[0]);
      } else {
#pragma unroll
        for (int k = 0; k <= D; ++k) atomicAdd(row + k, acc[k]);
      }
    }
  }
}

template <int D>
__global__ void vote_finalize_kernel(double* out, int64_t num_landmarks) {
  const int64_t l = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (l >= num_landmarks) return;
  double* row = out + l * (D + 2);
  const double weight = row[D];
  const bool valid = weight > 0.0;
  const double nan = __longlong_as_double(0x7ff8000000000000LL);
#pragma unroll
  for (int k = 0; k < D; ++k) row[k] = valid ? row[k] / weight : nan;
  row[D] = valid ? weight : 0.0;
  row[D + 1] = valid ? sqrt(row[D + 1] / weight) : nan;
}

template <int D, Transform T>
void launch(const KernelArgs& args, dim3 grid, cudaStream_t stream) {
  if (args.cells > 0) {
    vote_pass_kernel<D, T, false><<<grid, kThreads, 0, stream>>>(args);
    FASTLMK_CUDA_CHECK(cudaGetLastError());
    vote_pass_kernel<D, T, true><<<grid, kThreads, 0, stream>>>(args);
    FASTLMK_CUDA_CHECK(cudaGetLastError());
  }
  const int64_t num_landmarks = args.pb.num_landmarks;
  const unsigned finalize_blocks = static_cast<unsigned>((num_landmarks + kThreads - 1) / kThreads);
  vote_finalize_kernel<D><<<finalize_blocks, kThreads, 0, stream>>>(args.out, num_landmarks);
  FASTLMK_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void vote_cuda(const VoteProblem& problem, const float* prob, const float* disp, double* out,
               int device, std::uintptr_t stream_handle) {
  const int64_t num_landmarks = problem.num_landmarks;
  if (num_landmarks == 0) return;
  const int64_t cells = problem.num_cells();
  // 32-bit cell indices (grid-stride steps stay below 2**32 too).
  if (cells > static_cast<int64_t>(INT32_MAX)) {
    throw std::invalid_argument("fastlmk: the CUDA vote supports at most 2**31 - 1 grid cells");
  }

  DeviceGuard guard(device);
  const auto stream = reinterpret_cast<cudaStream_t>(stream_handle);
  int sms = 0;
  FASTLMK_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));

  KernelArgs args;
  args.pb = problem;
  for (int k = 0; k < 3; ++k) args.grid[k] = static_cast<uint32_t>(problem.grid[k]);
  args.cells = static_cast<uint32_t>(cells);
  args.prob = prob;
  args.disp = disp;
  args.out = out;

  const int64_t landmarks_y = std::min<int64_t>(num_landmarks, 65535);
  const int64_t by_work = (cells + int64_t{kThreads} * kMinCellsPerThread - 1) /
                          (int64_t{kThreads} * kMinCellsPerThread);
  const int64_t by_occupancy = (int64_t{kBlocksPerSm} * sms + landmarks_y - 1) / landmarks_y;
  const dim3 grid(static_cast<unsigned>(std::max<int64_t>(1, std::min(by_work, by_occupancy))),
                  static_cast<unsigned>(landmarks_y));

  FASTLMK_CUDA_CHECK(cudaMemsetAsync(out, 0, sizeof(double) * num_landmarks * (problem.dims + 2), stream));
  const bool log10 = problem.transform == Transform::kSignedLog10;
  if (problem.dims == 2) {
    log10 ? launch<2, Transform::kSignedLog10>(args, grid, stream)
          : launch<2, Transform::kLinear>(args, grid, stream);
  } else {
    log10 ? launch<3, Transform::kSignedLog10>(args, grid, stream)
          : launch<3, Transform::kLinear>(args, grid, stream);
  }
}

int cuda_device_count() noexcept {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();  // leave no error behind for the next CUDA call
    return 0;
  }
  return count;
}

}  // namespace fastlmk
