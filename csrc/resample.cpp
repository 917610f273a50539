// fastlmk._C.resample_axis_cpu, stage_rows_cpu and crop_cpu: argument checks and the
// pybind11 bindings of the CPU preprocessing kernels (csrc/cpu/resample_cpu.cpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "cpu/resample_cpu.h"

namespace py = pybind11;

namespace fastlmk {
namespace {

ElementType element_type(const py::array& x) {
  const py::dtype dt = x.dtype();
  if (dt.is(py::dtype::of<uint8_t>())) return ElementType::kUInt8;
  if (dt.is(py::dtype::of<int8_t>())) return ElementType::kInt8;
  if (dt.is(py::dtype::of<uint16_t>())) return ElementType::kUInt16;
  if (dt.is(py::dtype::of<int16_t>())) return ElementType::kInt16;
  if (dt.is(py::dtype::of<int32_t>())) return ElementType::kInt32;
  if (dt.is(py::dtype::of<float>())) return ElementType::kFloat32;
  if (dt.is(py::dtype::of<double>())) return ElementType::kFloat64;
  throw py::type_error(
      "x must be a native uint8, int8, uint16, int16, int32, float32 or float64 array, got " +
      std::string(py::str(dt)));
}

void check_threads(int threads) {
  if (threads < 0) throw py::value_error("threads must be >= 0 (0: one per hardware thread)");
}

py::array_t<float> resample_axis_py(const py::array& x, const py::array_t<int64_t>& first,
                                    const py::array_t<float>& weights, int threads) {
  check_threads(threads);
  if (x.ndim() != 3) {
    throw py::value_error("x must have shape (lead, n_in, trail), got " +
                          std::to_string(x.ndim()) + " axes");
  }
  if (!(x.flags() & py::array::c_style)) {
    throw py::value_error("x must be C-contiguous; pass a copy");
  }
  const ElementType type = element_type(x);
  if (first.ndim() != 1 || !(first.flags() & py::array::c_style) ||
      !py::isinstance<py::array_t<int64_t>>(first)) {
    throw py::value_error("first must be a C-contiguous (n_out,) int64 array");
  }
  if (weights.ndim() != 2 || !(weights.flags() & py::array::c_style) ||
      !py::isinstance<py::array_t<float>>(weights) || weights.shape(0) != first.shape(0)) {
    throw py::value_error("weights must be a C-contiguous (n_out, taps) float32 array with "
                          "one row per entry of first");
  }
  AxisMap m;
  m.lead = x.shape(0);
  m.n_in = x.shape(1);
  m.trail = x.shape(2);
  m.n_out = first.shape(0);
  m.taps = weights.shape(1);
  m.first = first.data();
  m.weights = weights.data();
  if (m.n_in < 1) throw py::value_error("x has an empty resampled axis");
  py::array_t<float> out({m.lead, m.n_out, m.trail});
  float* dst = out.mutable_data();
  const void* src = x.data();
  {
    py::gil_scoped_release release;
    resample_axis_cpu(m, src, type, dst, threads);
  }
  return out;
}

py::array_t<float> crop_py(const py::array& x, const std::vector<py::array_t<int64_t>>& first,
                           const std::vector<py::array_t<float>>& weights, int threads) {
  check_threads(threads);
  const int dims = static_cast<int>(x.ndim());
  if (dims != 2 && dims != 3) {
    throw py::value_error("x must be a 2D (Y, X) or 3D (Z, Y, X) image, got " +
                          std::to_string(dims) + " axes");
  }
  if (!(x.flags() & py::array::c_style)) throw py::value_error("x must be C-contiguous");
  if (static_cast<int>(first.size()) != dims || static_cast<int>(weights.size()) != dims) {
    throw py::value_error("first and weights need one array per image axis");
  }
  const ElementType type = element_type(x);
  CropMap m;
  const int pad = 3 - dims;  // a 2D image is a 3D one with one plane
  for (int d = 0; d < pad; ++d) m.size[d] = 1;
  int64_t num_crops = -1;
  for (int d = 0; d < dims; ++d) {
    const auto& f = first[static_cast<size_t>(d)];
    const auto& w = weights[static_cast<size_t>(d)];
    if (f.ndim() != 2 || !(f.flags() & py::array::c_style) || w.ndim() != 3 ||
        !(w.flags() & py::array::c_style) || w.shape(0) != f.shape(0) ||
        w.shape(1) != f.shape(1) || w.shape(2) < 1 || f.shape(1) < 1) {
      throw py::value_error("axis " + std::to_string(d) +
                            ": first must be C-contiguous (K, P) int64 and weights "
                            "C-contiguous (K, P, taps) float32 with P >= 1 and taps >= 1");
    }
    if (num_crops >= 0 && f.shape(0) != num_crops) {
      throw py::value_error("every axis needs the same number of crops");
    }
    num_crops = f.shape(0);
    if (x.shape(d) < 1) throw py::value_error("x is empty");
    m.size[d + pad] = x.shape(d);
    m.crop[d + pad] = f.shape(1);
    m.taps[d + pad] = w.shape(2);
    m.first[d + pad] = f.data();
    m.weights[d + pad] = w.data();
  }
  // The added plane axis: one sample of weight 1.
  std::vector<int64_t> plane_first(static_cast<size_t>(std::max<int64_t>(num_crops, 1)), 0);
  std::vector<float> plane_weight(plane_first.size(), 1.0f);
  if (pad) {
    m.first[0] = plane_first.data();
    m.weights[0] = plane_weight.data();
  }
  m.num_crops = num_crops;
  std::vector<py::ssize_t> shape = {static_cast<py::ssize_t>(num_crops)};
  for (int d = 0; d < dims; ++d) shape.push_back(static_cast<py::ssize_t>(m.crop[d + pad]));
  py::array_t<float> out(shape);
  float* dst = out.mutable_data();
  const void* src = x.data();
  {
    py::gil_scoped_release release;
    crop_cpu(m, src, type, dst, threads);
  }
  return out;
}

using DoubleArray = py::array_t<double, py::array::c_style | py::array::forcecast>;

py::tuple stage_rows_py(const DoubleArray& q, const DoubleArray& kernel, double ratio,
                        int64_t n_in, int64_t n_out) {
  if (kernel.ndim() != 1 || kernel.shape(0) % 2 != 1) {
    throw py::value_error("kernel must be a 1D array of odd length");
  }
  if (n_in < 1 || n_out < 1 || !(ratio > 0.0) || !std::isfinite(ratio)) {
    throw py::value_error("n_in and n_out must be >= 1 and ratio positive and finite");
  }
  StageRows r;
  r.n_in = n_in;
  r.n_out = n_out;
  r.ratio = ratio;
  r.kernel = kernel.data();
  r.kernel_len = kernel.shape(0);
  std::vector<py::ssize_t> shape(q.shape(), q.shape() + q.ndim());
  std::vector<py::ssize_t> wshape = shape;
  wshape.push_back(static_cast<py::ssize_t>(r.taps()));
  py::array_t<int64_t> first(shape);
  py::array_t<float> weights(wshape);
  const double* src = q.data();
  for (py::ssize_t i = 0; i < q.size(); ++i) {
    if (!std::isfinite(src[i])) throw py::value_error("positions must be finite");
  }
  int64_t* f = first.mutable_data();
  float* w = weights.mutable_data();
  const int64_t n = q.size();
  {
    py::gil_scoped_release release;
    stage_rows_cpu(r, src, n, f, w);
  }
  return py::make_tuple(first, weights);
}

}  // namespace

void bind_resample(py::module_& m) {
  m.def("resample_axis_cpu", &resample_axis_py, py::arg("x"), py::arg("first"),
        py::arg("weights"), py::kw_only(), py::arg("threads") = 0,
        "Resample axis 1 of a (lead, n_in, trail) array: out[l, j, c] = sum_t weights[j, t] "
        "* x[l, clamp(first[j] + t, 0, n_in - 1), c]; float32 (lead, n_out, trail).");
  m.def("stage_rows_cpu", &stage_rows_py, py::arg("q"), py::arg("kernel"), py::arg("ratio"),
        py::arg("n_in"), py::arg("n_out"),
        "Compact rows (first int64 (*q.shape), weights float32 (*q.shape, taps)) sampling "
        "a stage grid (input smoothed by kernel, sampled at j * ratio) at positions q.");
  m.def("crop_cpu", &crop_py, py::arg("x"), py::arg("first"), py::arg("weights"),
        py::kw_only(), py::arg("threads") = 0,
        "Separable crops of a 2D/3D image: per axis d, first[d] (K, P_d) int64 and "
        "weights[d] (K, P_d, taps_d) float32; float32 (K, *P).");
}

}  // namespace fastlmk
