// fastlmk._C: argument checks, CPU/CUDA dispatch and the pybind11 binding of
// the probability-weighted landmark vote.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu/vote_cpu.h"
#ifdef WITH_CUDA
#include "cuda/vote_cuda.h"
#endif

namespace py = pybind11;

namespace fastlmk {
// csrc/resample.cpp
void bind_resample(py::module_& m);
}  // namespace fastlmk

namespace fastlmk {
namespace {

std::string shape_str(const std::vector<int64_t>& shape) {
  std::string s = "(";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + (shape.size() == 1 ? ",)" : ")");
}

std::vector<double> per_axis(const std::vector<double>& values, int dims, const char* name) {
  if (values.size() == 1) return std::vector<double>(static_cast<size_t>(dims), values[0]);
  if (static_cast<int>(values.size()) != dims) {
    throw py::value_error(std::string(name) + " must have 1 or " + std::to_string(dims) +
                          " values (one per grid axis), got " + std::to_string(values.size()));
  }
  return values;
}

VoteProblem make_problem(const std::vector<int64_t>& prob_shape,
                         const std::vector<int64_t>& prob_strides,
                         const std::vector<int64_t>& disp_shape,
                         const std::vector<int64_t>& disp_strides, const std::vector<double>& stride,
                         const std::vector<double>& origin, const std::string& transform,
                         double min_prob) {
  const int ndim = static_cast<int>(prob_shape.size());
  if (ndim != 3 && ndim != 4) {
    throw py::value_error("prob must have shape (L, *grid) with 2 or 3 grid axes, got shape " +
                          shape_str(prob_shape));
  }
  const int dims = ndim - 1;
  std::vector<int64_t> expected = {prob_shape[0], dims};
  expected.insert(expected.end(), prob_shape.begin() + 1, prob_shape.end());
  if (disp_shape != expected) {
    throw py::value_error("disp must have shape (L, D, *grid) = " + shape_str(expected) +
                          " to match prob " + shape_str(prob_shape) + ", got " +
                          shape_str(disp_shape));
  }
  if (prob_strides.size() != prob_shape.size() || disp_strides.size() != disp_shape.size()) {
    throw py::value_error("prob_strides and disp_strides need one entry per axis");
  }

  VoteProblem pb;
  pb.num_landmarks = prob_shape[0];
  pb.dims = dims;
  for (int k = 0; k < dims; ++k) pb.grid[k] = prob_shape[k + 1];
  for (int k = 0; k <= dims; ++k) pb.prob_strides[k] = prob_strides[k];
  for (int k = 0; k <= dims + 1; ++k) pb.disp_strides[k] = disp_strides[k];

  const auto strides = per_axis(stride, dims, "stride");
  const auto origins = per_axis(origin, dims, "origin");
  for (int k = 0; k < dims; ++k) {
    if (!(strides[k] > 0.0) || !std::isfinite(strides[k])) {
      throw py::value_error("stride must be positive and finite (input pixels per grid cell), got " +
                            std::to_string(strides[k]) + " on axis " + std::to_string(k));
    }
    if (!std::isfinite(origins[k])) {
      throw py::value_error("origin must be finite, got " + std::to_string(origins[k]) +
                            " on axis " + std::to_string(k));
    }
    pb.stride[k] = strides[k];
    pb.origin[k] = origins[k];
  }

  if (transform == "linear") {
    pb.transform = Transform::kLinear;
  } else if (transform == "signed_log10") {
    pb.transform = Transform::kSignedLog10;
  } else {
    throw py::value_error("transform must be 'linear' or 'signed_log10', got '" + transform + "'");
  }
  if (!(min_prob >= 0.0)) {
    throw py::value_error("min_prob must be >= 0, got " + std::to_string(min_prob));
  }
  pb.min_prob = min_prob;
  return pb;
}

// Shape and element strides of a float32 numpy array (any layout, no copy).
void float32_layout(const py::array& a, const char* name, std::vector<int64_t>& shape,
                    std::vector<int64_t>& strides) {
  if (!py::isinstance<py::array_t<float>>(a)) {
    throw py::type_error(std::string(name) + " must be a native float32 array, got dtype " +
                         std::string(py::str(a.dtype())));
  }
  shape.assign(a.shape(), a.shape() + a.ndim());
  strides.clear();
  for (py::ssize_t k = 0; k < a.ndim(); ++k) {
    if (a.strides(k) % static_cast<py::ssize_t>(sizeof(float)) != 0) {
      throw py::value_error(std::string(name) +
                            " has strides that are not a multiple of 4 bytes; pass a copy");
    }
    strides.push_back(a.strides(k) / static_cast<py::ssize_t>(sizeof(float)));
  }
}

py::array_t<double> vote_cpu_py(const py::array& prob, const py::array& disp,
                                const std::vector<double>& stride,
                                const std::vector<double>& origin, const std::string& transform,
                                double min_prob) {
  std::vector<int64_t> prob_shape, prob_strides, disp_shape, disp_strides;
  float32_layout(prob, "prob", prob_shape, prob_strides);
  float32_layout(disp, "disp", disp_shape, disp_strides);
  const VoteProblem pb = make_problem(prob_shape, prob_strides, disp_shape, disp_strides, stride,
                                      origin, transform, min_prob);

  py::array_t<double> out({static_cast<py::ssize_t>(pb.num_landmarks),
                           static_cast<py::ssize_t>(pb.dims + 2)});
  const auto* prob_ptr = static_cast<const float*>(prob.data());
  const auto* disp_ptr = static_cast<const float*>(disp.data());
  double* out_ptr = out.mutable_data();
  {
    py::gil_scoped_release release;
    vote_cpu(pb, prob_ptr, disp_ptr, out_ptr);
  }
  return out;
}

void vote_cuda_py(std::uintptr_t prob_ptr, const std::vector<int64_t>& prob_shape,
                  const std::vector<int64_t>& prob_strides, std::uintptr_t disp_ptr,
                  const std::vector<int64_t>& disp_shape, const std::vector<int64_t>& disp_strides,
                  const std::vector<double>& stride, const std::vector<double>& origin,
                  const std::string& transform, double min_prob, std::uintptr_t out_ptr, int device,
                  std::uintptr_t stream) {
#ifdef WITH_CUDA
  const VoteProblem pb = make_problem(prob_shape, prob_strides, disp_shape, disp_strides, stride,
                                      origin, transform, min_prob);
  if (prob_ptr % alignof(float) || disp_ptr % alignof(float) || out_ptr % alignof(double)) {
    throw py::value_error("prob, disp and out must be aligned float32/float64 device pointers");
  }
  py::gil_scoped_release release;
  vote_cuda(pb, reinterpret_cast<const float*>(prob_ptr), reinterpret_cast<const float*>(disp_ptr),
            reinterpret_cast<double*>(out_ptr), device, stream);
#else
  throw std::runtime_error("fastlmk was built without CUDA support; rebuild with nvcc on PATH");
#endif
}

bool cuda_compiled() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

int device_count() {
#ifdef WITH_CUDA
  return cuda_device_count();
#else
  return 0;
#endif
}

}  // namespace
}  // namespace fastlmk

PYBIND11_MODULE(_C, m) {
  using namespace fastlmk;
  m.doc() =
      "fastlmk's compiled kernels: the probability-weighted landmark vote (CPU and CUDA) and "
      "the separable resampling of the CPU preprocessing.";

  m.def("vote_cpu", &vote_cpu_py, py::arg("prob"), py::arg("disp"), py::kw_only(),
        py::arg("stride"), py::arg("origin"), py::arg("transform"), py::arg("min_prob"),
        "Vote on the CPU; returns an (L, D + 2) float64 array (position, weight, spread).");
  m.def("vote_cuda", &vote_cuda_py, py::kw_only(), py::arg("prob_ptr"), py::arg("prob_shape"),
        py::arg("prob_strides"), py::arg("disp_ptr"), py::arg("disp_shape"),
        py::arg("disp_strides"), py::arg("stride"), py::arg("origin"), py::arg("transform"),
        py::arg("min_prob"), py::arg("out_ptr"), py::arg("device"), py::arg("stream"),
        "Enqueue the vote on a CUDA stream, writing (L, D + 2) float64 rows to out_ptr.");
  m.def("cuda_compiled", &cuda_compiled, "Whether this build contains the CUDA kernel.");
  m.def("cuda_device_count", &device_count,
        "Number of visible CUDA devices; 0 without CUDA support, driver or device.");
  bind_resample(m);
}
