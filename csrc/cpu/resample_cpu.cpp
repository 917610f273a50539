#include "resample_cpu.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <system_error>
#include <thread>
#include <vector>

// The portable build targets baseline x86-64 (SSE2); with GCC the hot loops also get an
// AVX2 + FMA clone (x86-64-v3), picked once at load time by CPU features. (An
// "arch=haswell" clone is picked by CPU model, so never on AMD processors.)
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define FASTLMK_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FASTLMK_VECTOR_CLONES
#endif

namespace fastlmk {
namespace {

// Below this many multiply-adds per thread, starting a thread costs more than it saves.
constexpr int64_t kMinMacsPerThread = 1 << 20;
// Columns (or rows, when the resampled axis is the last one) computed together: their
// accumulators stay in vector registers over all taps of an output sample.
constexpr int64_t kStrip = 32;

inline int64_t clamp_index(int64_t i, int64_t n) {
  return i < 0 ? 0 : (i >= n ? n - 1 : i);
}

// Eight float32 lanes (GCC/Clang vector extension): one AVX register, or two SSE
// registers in the baseline build.
typedef float Lanes __attribute__((vector_size(32)));
static_assert(kStrip == 4 * 8, "combine_rows keeps kStrip accumulators in four Lanes");

inline __attribute__((always_inline)) Lanes load_lanes(const float* p) {
  Lanes v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// out[k] = sum_t w[t] * strip[clamp(first + t), k] for the kStrip columns of a float32
// (n_in, kStrip) strip. Explicit vectors: written as a loop over k, the accumulators
// went through memory on every tap.
inline __attribute__((always_inline)) void combine_rows(const float* strip, int64_t n_in,
                                                        int64_t first, const float* w,
                                                        int64_t taps, float* out) {
  Lanes a0 = {}, a1 = {}, a2 = {}, a3 = {};
  for (int64_t t = 0; t < taps; ++t) {
    const float wt = w[t];
    const float* s = strip + clamp_index(first + t, n_in) * kStrip;
    a0 += wt * load_lanes(s);
    a1 += wt * load_lanes(s + 8);
    a2 += wt * load_lanes(s + 16);
    a3 += wt * load_lanes(s + 24);
  }
  std::memcpy(out, &a0, sizeof a0);
  std::memcpy(out + 8, &a1, sizeof a1);
  std::memcpy(out + 16, &a2, sizeof a2);
  std::memcpy(out + 24, &a3, sizeof a3);
}

// One task: a strip of up to kStrip columns (trail > 1) or rows (trail == 1) of the
// input, converted to float32 once into `strip` (n_in, kStrip), then every output
// sample of that strip. The input is read once and every multiply-add reads the strip
// from cache, whatever the element type and whichever axis is resampled.
template <typename T>
FASTLMK_VECTOR_CLONES void strip_task(const AxisMap& m, const T* x, float* out,
                                      int64_t task, float* strip) {
  float acc[kStrip];
  if (m.trail > 1) {
    const int64_t strips = (m.trail + kStrip - 1) / kStrip;
    const int64_t l = task / strips;
    const int64_t c0 = (task % strips) * kStrip;
    const int64_t width = std::min(kStrip, m.trail - c0);
    for (int64_t i = 0; i < m.n_in; ++i) {
      const T* src = x + (l * m.n_in + i) * m.trail + c0;
      float* row = strip + i * kStrip;
      for (int64_t k = 0; k < width; ++k) row[k] = static_cast<float>(src[k]);
      for (int64_t k = width; k < kStrip; ++k) row[k] = 0.0f;
    }
    for (int64_t j = 0; j < m.n_out; ++j) {
      combine_rows(strip, m.n_in, m.first[j], m.weights + j * m.taps, m.taps, acc);
      std::memcpy(out + (l * m.n_out + j) * m.trail + c0, acc,
                  static_cast<size_t>(width) * sizeof(float));
    }
  } else {
    const int64_t l0 = task * kStrip;
    const int64_t width = std::min(kStrip, m.lead - l0);
    for (int64_t k = 0; k < kStrip; ++k) {
      if (k < width) {
        const T* src = x + (l0 + k) * m.n_in;
        for (int64_t i = 0; i < m.n_in; ++i) strip[i * kStrip + k] = static_cast<float>(src[i]);
      } else {
        for (int64_t i = 0; i < m.n_in; ++i) strip[i * kStrip + k] = 0.0f;
      }
    }
    for (int64_t j = 0; j < m.n_out; ++j) {
      combine_rows(strip, m.n_in, m.first[j], m.weights + j * m.taps, m.taps, acc);
      for (int64_t k = 0; k < width; ++k) out[(l0 + k) * m.n_out + j] = acc[k];
    }
  }
}

template <typename T>
void run(const AxisMap& m, const T* x, float* out) {
  const int64_t num_tasks = m.trail > 1 ? m.lead * ((m.trail + kStrip - 1) / kStrip)
                                        : (m.lead + kStrip - 1) / kStrip;
  const int64_t macs = m.lead * m.n_out * m.trail * m.taps;
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    std::vector<float> strip(static_cast<size_t>(m.n_in * kStrip));
    for (int64_t t = next.fetch_add(1); t < num_tasks; t = next.fetch_add(1)) {
      strip_task(m, x, out, t, strip.data());
    }
  };
  const int64_t hardware = std::max(1u, std::thread::hardware_concurrency());
  const int64_t wanted =
      std::min({hardware, num_tasks, std::max<int64_t>(1, macs / kMinMacsPerThread)});
  std::vector<std::thread> helpers;
  try {
    for (int64_t t = 1; t < wanted; ++t) helpers.emplace_back(worker);
  } catch (const std::system_error&) {
    // Fewer threads than wanted: the calling thread still finishes all tasks.
  }
  worker();
  for (auto& h : helpers) h.join();
}

}  // namespace

void resample_axis_cpu(const AxisMap& map, const void* x, ElementType type, float* out) {
  switch (type) {
    case ElementType::kUInt8: return run(map, static_cast<const uint8_t*>(x), out);
    case ElementType::kInt8: return run(map, static_cast<const int8_t*>(x), out);
    case ElementType::kUInt16: return run(map, static_cast<const uint16_t*>(x), out);
    case ElementType::kInt16: return run(map, static_cast<const int16_t*>(x), out);
    case ElementType::kInt32: return run(map, static_cast<const int32_t*>(x), out);
    case ElementType::kFloat32: return run(map, static_cast<const float*>(x), out);
    case ElementType::kFloat64: return run(map, static_cast<const double*>(x), out);
  }
}

}  // namespace fastlmk
