// fastlmk._C.resample_axis_cpu: argument checks and the pybind11 binding of the
// separable resampling kernel (csrc/cpu/resample_cpu.cpp).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

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

py::array_t<float> resample_axis_py(const py::array& x, const py::array_t<int64_t>& first,
                                    const py::array_t<float>& weights) {
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
    resample_axis_cpu(m, src, type, dst);
  }
  return out;
}

}  // namespace

void bind_resample(py::module_& m) {
  m.def("resample_axis_cpu", &resample_axis_py, py::arg("x"), py::arg("first"),
        py::arg("weights"),
        "Resample axis 1 of a (lead, n_in, trail) array: out[l, j, c] = sum_t weights[j, t] "
        "* x[l, clamp(first[j] + t, 0, n_in - 1), c]; float32 (lead, n_out, trail).");
}

}  // namespace fastlmk
