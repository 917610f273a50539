#include "vote_cpu.h"

#include "parallel.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

namespace fastlmk {
namespace {

// Work is split into fixed-size chunks of cells so that the result (the order
// of the floating-point merges) does not depend on the thread count.
constexpr int64_t kChunkCells = 16384;
// Below this many cells per thread, starting a thread costs more than it saves.
constexpr int64_t kMinCellsPerThread = 32768;
constexpr double kLn10 = 2.302585092994045684;

// Weighted first and second moments of a set of votes.
struct Moments {
  double weight = 0.0;
  double mean[3] = {0.0, 0.0, 0.0};
  double m2 = 0.0;  // sum of w * ||v - mean||^2
};

// Chan et al.'s pairwise update: merging moments of two sets without
// revisiting their votes keeps the spread accurate when the mean is far from 0.
void merge_into(Moments& a, const Moments& b, int dims) {
  if (!(b.weight > 0.0)) return;
  if (!(a.weight > 0.0)) {
    a = b;
    return;
  }
  const double total = a.weight + b.weight;
  const double fb = b.weight / total;
  double dist2 = 0.0;
  for (int k = 0; k < dims; ++k) {
    const double delta = b.mean[k] - a.mean[k];
    a.mean[k] += delta * fb;
    dist2 += delta * delta;
  }
  a.m2 += b.m2 + dist2 * a.weight * fb;
  a.weight = total;
}

template <Transform T>
inline double to_pixels(float t) {
  const double td = static_cast<double>(t);
  if constexpr (T == Transform::kLinear) {
    return td;
  } else {
    // exp - 1 rather than expm1: the absolute error (what a position needs) is the
    // same, and exp is twice as fast.
    return std::copysign(std::exp(std::fabs(td) * kLn10) - 1.0, td);
  }
}

// Moments of the votes of landmark `l` over cells [begin, end) in row-major
// cell order. Sums are taken relative to the chunk's first vote (a shifted
// sum), so a tight cluster far from the origin loses no precision.
template <int D, Transform T>
Moments chunk_moments(const VoteProblem& pb, const float* prob, const float* disp, int64_t l,
                      int64_t begin, int64_t end) {
  int64_t idx[D];
  {
    int64_t rest = begin;
    for (int k = D - 1; k >= 0; --k) {
      idx[k] = rest % pb.grid[k];
      rest /= pb.grid[k];
    }
  }
  const int64_t n_last = pb.grid[D - 1];
  const int64_t ps_last = pb.prob_strides[D];
  const int64_t ds_last = pb.disp_strides[D + 1];
  const double min_prob = pb.min_prob;

  double weight = 0.0, s1[D] = {}, s2 = 0.0, shift[D] = {};
  bool shifted = false;

  for (int64_t i = begin; i < end;) {
    const int64_t run = std::min(n_last - idx[D - 1], end - i);
    int64_t p_off = l * pb.prob_strides[0];
    int64_t d_off = l * pb.disp_strides[0];
    for (int k = 0; k < D; ++k) {
      p_off += idx[k] * pb.prob_strides[k + 1];
      d_off += idx[k] * pb.disp_strides[k + 2];
    }
    double centre[D];  // the last axis' entry is set per cell below
    for (int k = 0; k < D - 1; ++k) {
      centre[k] = pb.origin[k] + static_cast<double>(idx[k]) * pb.stride[k];
    }
    const float* p_row = prob + p_off;
    const float* d_row[D];
    for (int k = 0; k < D; ++k) d_row[k] = disp + d_off + k * pb.disp_strides[1];

    for (int64_t j = 0; j < run; ++j) {
      const double w = static_cast<double>(p_row[j * ps_last]);
      // `!(w > 0)` also drops NaN probabilities.
      if (!(w > 0.0) || w < min_prob) continue;
      double v[D];
      centre[D - 1] = pb.origin[D - 1] + static_cast<double>(idx[D - 1] + j) * pb.stride[D - 1];
      for (int k = 0; k < D; ++k) v[k] = centre[k] + to_pixels<T>(d_row[k][j * ds_last]);
      if (!shifted) {
        for (int k = 0; k < D; ++k) shift[k] = v[k];
        shifted = true;
      }
      double r2 = 0.0;
      for (int k = 0; k < D; ++k) {
        const double dv = v[k] - shift[k];
        s1[k] += w * dv;
        r2 += dv * dv;
      }
      weight += w;
      s2 += w * r2;
    }

    i += run;
    idx[D - 1] += run;
    for (int k = D - 1; k > 0 && idx[k] == pb.grid[k]; --k) {
      idx[k] = 0;
      ++idx[k - 1];
    }
  }

  Moments m;
  if (!(weight > 0.0)) return m;
  m.weight = weight;
  double norm2 = 0.0;
  for (int k = 0; k < D; ++k) {
    const double mean_shifted = s1[k] / weight;
    m.mean[k] = shift[k] + mean_shifted;
    norm2 += s1[k] * mean_shifted;
  }
  m.m2 = std::max(s2 - norm2, 0.0);
  return m;
}

using ChunkFn = Moments (*)(const VoteProblem&, const float*, const float*, int64_t, int64_t,
                            int64_t);

ChunkFn select_kernel(int dims, Transform transform) {
  const bool log10 = transform == Transform::kSignedLog10;
  if (dims == 2) {
    return log10 ? chunk_moments<2, Transform::kSignedLog10> : chunk_moments<2, Transform::kLinear>;
  }
  return log10 ? chunk_moments<3, Transform::kSignedLog10> : chunk_moments<3, Transform::kLinear>;
}

}  // namespace

void vote_cpu(const VoteProblem& problem, const float* prob, const float* disp, double* out) {
  const int64_t num_landmarks = problem.num_landmarks;
  const int dims = problem.dims;
  const int64_t cells = problem.num_cells();
  const int64_t chunks_per_landmark = std::max<int64_t>(1, (cells + kChunkCells - 1) / kChunkCells);
  const int64_t num_tasks = num_landmarks * chunks_per_landmark;
  const ChunkFn kernel = select_kernel(dims, problem.transform);

  std::vector<Moments> partial(static_cast<size_t>(num_tasks));
  std::atomic<int64_t> next_task{0};
  auto worker = [&]() {
    for (int64_t t = next_task.fetch_add(1); t < num_tasks; t = next_task.fetch_add(1)) {
      const int64_t l = t / chunks_per_landmark;
      const int64_t begin = (t % chunks_per_landmark) * kChunkCells;
      const int64_t end = std::min(begin + kChunkCells, cells);
      partial[static_cast<size_t>(t)] =
          begin < end ? kernel(problem, prob, disp, l, begin, end) : Moments{};
    }
  };

  run_on_threads(thread_count(0, num_tasks, num_landmarks * cells, kMinCellsPerThread), worker);

  const double nan = std::numeric_limits<double>::quiet_NaN();
  for (int64_t l = 0; l < num_landmarks; ++l) {
    Moments total;
    for (int64_t c = 0; c < chunks_per_landmark; ++c) {
      merge_into(total, partial[static_cast<size_t>(l * chunks_per_landmark + c)], dims);
    }
    double* row = out + l * (dims + 2);
    const bool valid = total.weight > 0.0;
    for (int k = 0; k < dims; ++k) row[k] = valid ? total.mean[k] : nan;
    row[dims] = valid ? total.weight : 0.0;
    row[dims + 1] = valid ? std::sqrt(total.m2 / total.weight) : nan;
  }
}

}  // namespace fastlmk
