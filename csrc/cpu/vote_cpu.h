// Probability-weighted landmark vote on the CPU.
#pragma once

#include <cstdint>

namespace fastlmk {

enum class Transform : int { kLinear = 0, kSignedLog10 = 1 };

// One vote problem: the shapes, element strides and parameters shared by the
// CPU and CUDA kernels. Grid axes are in array (numpy) order.
struct VoteProblem {
  int64_t num_landmarks = 0;    // L
  int dims = 0;                 // D, 2 or 3
  int64_t grid[3] = {1, 1, 1};  // grid shape; entries past D are 1
  // Element strides (not bytes); may be zero or negative.
  int64_t prob_strides[4] = {0, 0, 0, 0};     // prob (L, *grid)
  int64_t disp_strides[5] = {0, 0, 0, 0, 0};  // disp (L, D, *grid)
  double stride[3] = {1, 1, 1};  // input pixels per grid cell, per axis
  double origin[3] = {0, 0, 0};  // input-pixel index of the centre of cell 0
  Transform transform = Transform::kSignedLog10;
  double min_prob = 0.0;

  int64_t num_cells() const { return grid[0] * grid[1] * grid[2]; }
};

// Writes out[l] = (position[0..D), weight, spread) for every landmark, an
// (L, D + 2) row-major float64 buffer. Runs on a pool of std::threads; the
// result does not depend on the number of threads.
void vote_cpu(const VoteProblem& problem, const float* prob, const float* disp, double* out);

}  // namespace fastlmk
