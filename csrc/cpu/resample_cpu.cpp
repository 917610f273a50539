#include "resample_cpu.h"

#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
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

// Eight float32 lanes (GCC/Clang vector extension): one AVX register, or two SSE
// registers in the baseline build.
typedef float Lanes __attribute__((vector_size(32)));
static_assert(kStrip == 4 * 8, "combine_rows keeps kStrip accumulators in four Lanes");

inline int64_t clamp_index(int64_t i, int64_t n) { return i < 0 ? 0 : (i >= n ? n - 1 : i); }

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

// Number of strip tasks of an axis map.
inline int64_t strip_tasks(const AxisMap& m) {
  return m.trail > 1 ? m.lead * ((m.trail + kStrip - 1) / kStrip)
                     : (m.lead + kStrip - 1) / kStrip;
}

// One task: a strip of up to kStrip columns (trail > 1) or rows (trail == 1) of the
// input, converted to float32 once into `strip` (n_in, kStrip), then every output
// sample of that strip. The input is read once and every multiply-add reads the strip
// from cache, whatever the element type and whichever axis is resampled.
template <typename T>
inline __attribute__((always_inline)) void strip_task(const AxisMap& m, const T* x, float* out,
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
FASTLMK_VECTOR_CLONES void axis_tasks(const AxisMap& m, const T* x, float* out, int64_t begin,
                                      int64_t end, float* strip) {
  for (int64_t t = begin; t < end; ++t) strip_task(m, x, out, t, strip);
}

// Runs fn(task, scratch) for every task on a pool of std::threads; each worker has its
// own scratch buffer of `scratch` floats.
template <typename Fn>
void run_tasks(int64_t num_tasks, int64_t macs, int64_t scratch, int threads, Fn&& fn) {
  std::atomic<int64_t> next{0};
  auto worker = [&]() {
    std::vector<float> buffer(static_cast<size_t>(std::max<int64_t>(scratch, 1)));
    for (int64_t t = next.fetch_add(1); t < num_tasks; t = next.fetch_add(1)) {
      fn(t, buffer.data());
    }
  };
  run_on_threads(thread_count(threads, num_tasks, macs, kMinMacsPerThread), worker);
}

template <typename T>
void run_axis(const AxisMap& m, const T* x, float* out, int threads) {
  run_tasks(strip_tasks(m), m.lead * m.n_out * m.trail * m.taps, m.n_in * kStrip, threads,
            [&](int64_t t, float* strip) { axis_tasks(m, x, out, t, t + 1, strip); });
}

// Input samples [lo, hi) of axis d that crop k reads (before clamping).
inline void crop_span(const CropMap& m, int d, int64_t k, int64_t& lo, int64_t& hi) {
  const int64_t* f = m.first[d] + k * m.crop[d];
  lo = f[0];
  hi = f[0];
  for (int64_t p = 0; p < m.crop[d]; ++p) {
    lo = std::min(lo, f[p]);
    hi = std::max(hi, f[p] + m.taps[d]);
  }
}

// Axis d of crop k over `in` (lead, n_in, trail), whose axis d starts at input sample
// `lo`: the crop's first samples made relative to it (inside it: no clamping needed).
// A helper, not a lambda, so that it is inlined into (and vectorised with) each clone.
inline __attribute__((always_inline)) void crop_pass(const CropMap& m, int64_t k, int d,
                                                     int64_t lo, int64_t n_in, const float* in,
                                                     int64_t lead, int64_t trail, float* dst,
                                                     int64_t* rel, float* strip) {
  const int64_t p = m.crop[d];
  for (int64_t i = 0; i < p; ++i) rel[i] = m.first[d][k * p + i] - lo;
  AxisMap a;
  a.lead = lead;
  a.n_in = n_in;
  a.trail = trail;
  a.n_out = p;
  a.taps = m.taps[d];
  a.first = rel;
  a.weights = m.weights[d] + k * p * m.taps[d];
  for (int64_t t = 0, n = strip_tasks(a); t < n; ++t) strip_task(a, in, dst, t, strip);
}

// One crop: the clamped input window gathered as float32, then one axis pass per axis
// over it, with the crop's first samples made relative to the window.
template <typename T>
FASTLMK_VECTOR_CLONES void crop_task(const CropMap& m, const T* x, float* out, int64_t k,
                                     float* scratch) {
  int64_t lo[3], hi[3], w[3];
  for (int d = 0; d < 3; ++d) {
    crop_span(m, d, k, lo[d], hi[d]);
    w[d] = hi[d] - lo[d];
  }
  const int64_t* p = m.crop;
  float* window = scratch;                     // (w0, w1, w2)
  float* pass0 = window + w[0] * w[1] * w[2];  // (p0, w1, w2)
  float* pass1 = pass0 + p[0] * w[1] * w[2];   // (p0, p1, w2)
  float* strip = pass1 + p[0] * p[1] * w[2];   // (max w, kStrip)
  for (int64_t z = 0; z < w[0]; ++z) {
    const T* plane = x + clamp_index(lo[0] + z, m.size[0]) * m.size[1] * m.size[2];
    for (int64_t y = 0; y < w[1]; ++y) {
      const T* src = plane + clamp_index(lo[1] + y, m.size[1]) * m.size[2];
      float* row = window + (z * w[1] + y) * w[2];
      if (lo[2] >= 0 && hi[2] <= m.size[2]) {
        for (int64_t c = 0; c < w[2]; ++c) row[c] = static_cast<float>(src[lo[2] + c]);
      } else {
        for (int64_t c = 0; c < w[2]; ++c) {
          row[c] = static_cast<float>(src[clamp_index(lo[2] + c, m.size[2])]);
        }
      }
    }
  }
  std::vector<int64_t> first(static_cast<size_t>(std::max({p[0], p[1], p[2]})));
  int64_t* rel = first.data();
  if (m.crop[0] == 1 && m.taps[0] == 1 && w[0] == 1 && m.weights[0][k] == 1.0f) {
    pass0 = window;  // a 2D image: the plane axis is the identity
  } else {
    crop_pass(m, k, 0, lo[0], w[0], window, 1, w[1] * w[2], pass0, rel, strip);
  }
  crop_pass(m, k, 1, lo[1], w[1], pass0, p[0], w[2], pass1, rel, strip);
  crop_pass(m, k, 2, lo[2], w[2], pass1, p[0] * p[1], 1, out + k * p[0] * p[1] * p[2], rel,
            strip);
}

template <typename T>
void run_crops(const CropMap& m, const T* x, float* out, int threads) {
  int64_t scratch = 0, macs = 0;
  for (int64_t k = 0; k < m.num_crops; ++k) {
    int64_t lo[3], hi[3], w[3];
    for (int d = 0; d < 3; ++d) {
      crop_span(m, d, k, lo[d], hi[d]);
      w[d] = hi[d] - lo[d];
    }
    const int64_t* p = m.crop;
    const int64_t strip = std::max({w[0], w[1], w[2]}) * kStrip;
    scratch = std::max(scratch, w[0] * w[1] * w[2] + p[0] * w[1] * w[2] +
                                    p[0] * p[1] * w[2] + strip);
    macs += p[0] * m.taps[0] * w[1] * w[2] + p[0] * p[1] * m.taps[1] * w[2] +
            p[0] * p[1] * p[2] * m.taps[2];
  }
  run_tasks(m.num_crops, macs, scratch, threads,
            [&](int64_t k, float* buffer) { crop_task(m, x, out, k, buffer); });
}

// fn(x as a pointer to its element type).
template <typename Fn>
void with_element_type(ElementType type, const void* x, Fn&& fn) {
  switch (type) {
    case ElementType::kUInt8: return fn(static_cast<const uint8_t*>(x));
    case ElementType::kInt8: return fn(static_cast<const int8_t*>(x));
    case ElementType::kUInt16: return fn(static_cast<const uint16_t*>(x));
    case ElementType::kInt16: return fn(static_cast<const int16_t*>(x));
    case ElementType::kInt32: return fn(static_cast<const int32_t*>(x));
    case ElementType::kFloat32: return fn(static_cast<const float*>(x));
    case ElementType::kFloat64: return fn(static_cast<const double*>(x));
  }
}

}  // namespace

void resample_axis_cpu(const AxisMap& map, const void* x, ElementType type, float* out,
                       int threads) {
  with_element_type(type, x, [&](const auto* p) { run_axis(map, p, out, threads); });
}

int64_t StageRows::taps() const {
  return static_cast<int64_t>(std::ceil(ratio)) + 2 + (kernel_len - 1);
}

void stage_rows_cpu(const StageRows& r, const double* q, int64_t n, int64_t* first,
                    float* weights) {
  const int64_t taps = r.taps();
  const int64_t radius = r.kernel_len / 2;
  std::vector<double> row(static_cast<size_t>(taps));
  for (int64_t i = 0; i < n; ++i) {
    // The two stage samples around q, each the smoothed input interpolated between its
    // two input neighbours: four kernels, centred at ii[c], weighted w[c].
    const double j0 = std::floor(q[i]);
    const double g = q[i] - j0;
    int64_t ii[4];
    double w[4];
    for (int s = 0; s < 2; ++s) {
      const double jj = j0 + s;
      const double c = (s == 0 ? 1.0 - g : g) * ((jj >= 0 && jj <= r.n_out - 1) ? 1.0 : 0.0);
      const double pos =
          std::min(std::max(jj, 0.0), static_cast<double>(r.n_out - 1)) * r.ratio;
      const double fl = std::floor(pos);
      const double frac = pos - fl;
      const int64_t lo = clamp_index(static_cast<int64_t>(fl), r.n_in);
      ii[2 * s] = lo;
      ii[2 * s + 1] = std::min(lo + 1, r.n_in - 1);
      w[2 * s] = c * (1.0 - frac);
      w[2 * s + 1] = c * frac;
    }
    const int64_t f = *std::min_element(ii, ii + 4) - radius;
    std::fill(row.begin(), row.end(), 0.0);
    for (int c = 0; c < 4; ++c) {
      const int64_t off = ii[c] - radius - f;
      for (int64_t t = 0; t < r.kernel_len; ++t) {
        row[static_cast<size_t>(off + t)] += w[c] * r.kernel[t];
      }
    }
    first[i] = f;
    for (int64_t t = 0; t < taps; ++t) {
      weights[i * taps + t] = static_cast<float>(row[static_cast<size_t>(t)]);
    }
  }
}

void crop_cpu(const CropMap& map, const void* x, ElementType type, float* out, int threads) {
  with_element_type(type, x, [&](const auto* p) { run_crops(map, p, out, threads); });
}

}  // namespace fastlmk
