// Op schemas of torch.ops.falqon and their CPU kernels (the reference numerics).
// CUDA kernels register under the same names in csrc/cuda/.
#include <Python.h>
#include <torch/library.h>

#include "falqon.h"

extern "C" {
// Importing falqon._C loads this library, whose static initialisers register the ops; the Python
// module itself is empty (the pattern of pytorch/extension-cpp).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace falqon {

void warn_user(const std::string& message) {
  if (!Py_IsInitialized()) {
    TORCH_WARN(message);
    return;
  }
  // torch.ops releases the GIL while an op runs: take it back for the warning.
  const PyGILState_STATE gil = PyGILState_Ensure();
  const int status = PyErr_WarnEx(PyExc_UserWarning, message.c_str(), 1);
  std::string error;
  if (status < 0) {  // the warning filters made it an error: raise it as ours
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    PyObject* text = value ? PyObject_Str(value) : nullptr;
    const char* utf8 = text ? PyUnicode_AsUTF8(text) : nullptr;
    error = utf8 ? utf8 : message;
    Py_XDECREF(text);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(traceback);
  }
  PyGILState_Release(gil);
  TORCH_CHECK(status >= 0, error);
}

}  // namespace falqon

TORCH_LIBRARY(falqon, m) {
  // Per-tensor FP8 quantisation: returns (q, scale) with scale = amax / fmax as a float32 device
  // scalar (1 when amax == 0) and q = fp8(clamp(input / scale)).
  m.def("quantize(Tensor input, ScalarType dtype) -> (Tensor, Tensor)");
  // Row-wise FP8 quantisation: (q, scale) with one scale per row of the last dimension, shaped
  // input.shape[:-1]: scale[i] = amax(row i) / fmax (1 where that is 0), q as quantize's cast.
  m.def("quantize_rows(Tensor input, ScalarType dtype) -> (Tensor, Tensor)");
  // Delayed scaling: the scale from the amaxes of previous calls, max(amax_history) / fmax (the
  // input's own amax while the history holds nothing > 0); values above it saturate. Returns
  // (q, scale, the input's own amax as a float32 device scalar) so that the caller can record it.
  m.def("quantize_delayed(Tensor input, ScalarType dtype, Tensor amax_history) -> "
        "(Tensor, Tensor, Tensor)");
  // The melded layer's forward: (y, xa, amax of x) from one FP8 product against W' = [W; A; 0].
  // xa = x A^T is kept for backward. amax_history (2, H), read only: delayed scaling of x (row 0)
  // and of the gradient in backward (row 1); None: current scaling. grad_dtype is the backward's.
  // adapter=False (the proxy mode): y is a view of the (..., N + r16) product with row stride
  // N + r16; lora_B only receives a gradient (it never enters the forward).
  // adapter=True: y = that + scaling * xa B^T, contiguous (B rounded to the activation dtype,
  // fp32 sums, one rounding); weight_t, if given, is the transpose of every row of W'.
  // input_fp8 and input_scale (both or neither; not with amax_history): x's quantisation as
  // quantize or quantize_rows(input, float8_e4m3fn) returns it, computed by the caller (once for
  // several layers that read the same x: q/k/v, gate/up; per row in MeldedLinear's adapter mode
  // on Hopper). The op then skips its own (per-tensor) quantisation and returns input_scale * 448
  // as the amax of x, one per row for a per-row scale (the GEMM then takes outer-vector scales).
  m.def(
      "melded_linear(Tensor input, Tensor weight, Tensor weight_scale, Tensor lora_B, "
      "Tensor? bias=None, Tensor? weight_t=None, float scaling=1.0, ScalarType? grad_dtype=None, "
      "Tensor? amax_history=None, bool adapter=False, Tensor? input_fp8=None, "
      "Tensor? input_scale=None) -> (Tensor, Tensor, Tensor)");
  // (dx, amax of g): dx = fp8(g) W_q * s_g * s through rows [0, N) of the melded weight (or its
  // transposed copy); amax_history (the gradient's H values): delayed scaling of g. rank: the
  // adapter's, which fixes N + r16 rows (required unless lora_B or weight_t fixes them).
  // lora_B (the adapter mode): dx = fp8(G) W'_q * s_G * s over every row of W' with the operand
  // G = [g | scaling g B | 0] quantised as one tensor.
  m.def(
      "melded_linear_grad_input(Tensor grad_output, Tensor weight, Tensor weight_scale, "
      "Tensor? weight_t=None, ScalarType? grad_dtype=None, Tensor? amax_history=None, "
      "Tensor? lora_B=None, float scaling=1.0, int? rank=None) -> (Tensor, Tensor)");
  // Delayed scaling's bookkeeping: amax becomes the newest value (index 0) of a 1-D float32
  // history, the oldest value dropped, in place and on the device; a NaN or Inf amax is not
  // recorded (the history is left as it was).
  m.def("record_amax_(Tensor(a!) amax_history, Tensor amax) -> ()");
  // Both gradients of the layer, (dx, dB, amax of g), reading g once for its quantisation and
  // for dB = scaling * g^T xa (fp32 sums, rounded once to grad_B_dtype; None: xa's dtype). dx,
  // amax_history and lora_B (the adapter mode) as in melded_linear_grad_input. melded_linear's
  // autograd uses it when both gradients are wanted.
  m.def(
      "melded_linear_backward(Tensor grad_output, Tensor xa, Tensor weight, Tensor weight_scale, "
      "Tensor? weight_t=None, float scaling=1.0, ScalarType? grad_dtype=None, "
      "Tensor? amax_history=None, ScalarType? grad_B_dtype=None, Tensor? lora_B=None) -> "
      "(Tensor, Tensor, Tensor)");
  // (W'_q, s) for a high-precision weight: A from the rank-r SVD of W's FP8 quantisation error;
  // adapter_row_norm > 0 rescales A (one factor) to that root-mean-square row norm, capped so
  // that A's amax stays at most W's (the adapter mode: a LoRA-sized A).
  m.def(
      "meld_init(Tensor weight, int rank, str svd=\"randomized\", int oversample=16, "
      "int power_iters=4, int seed=0, float adapter_row_norm=0.0) -> (Tensor, Tensor)");
  // The proxy update: the k rows of lora_B with the largest L1 norm are added into the FP8
  // weight, W'[T] = fp8(W'[T] + scaling B[T] A_q) in the scaled domain, saturating; then lora_B is
  // zeroed (keep_residual=False, the published policy) or only its applied rows are. The norms
  // are fp32 sums from left to right, and ties go to the lower row index (a NaN norm ranks
  // first): the same rows on every backend (falqon.h, ref::topk_rows).
  m.def(
      "topk_update_(Tensor(a!) weight, Tensor(b!) lora_B, Tensor(c!)? weight_t, int k, "
      "float scaling, bool keep_residual=False) -> ()");
  // topk_update_ of many layers at once, exactly as if each layer's op ran in turn (on CUDA in a
  // fixed number of launches whatever the layer count). Layer i: weights[i], lora_Bs[i], k = ks[i],
  // scalings[i], keep_residuals[i]; weight_ts[j] is the transposed copy of layer
  // weight_t_layers[j] (a list of the copies that exist: torch cannot functionalise a mutable
  // list holding None). Returns a bool (L,) tensor: whether each lora_B was finite before the
  // update. discard_nonfinite: if any was not, no weight changes and every lora_B is zeroed (the
  // optimizer step is discarded), decided on the device.
  m.def(
      "topk_update_many_(Tensor(a!)[] weights, Tensor(b!)[] lora_Bs, Tensor(c!)[] weight_ts, "
      "int[] weight_t_layers, int[] ks, float[] scalings, bool[] keep_residuals, "
      "bool discard_nonfinite=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(falqon, CPU, m) {
  m.impl("quantize", &falqon::ref::quantize);
  m.impl("quantize_rows", &falqon::ref::quantize_rows);
  m.impl("quantize_delayed", &falqon::ref::quantize_delayed);
  m.impl("melded_linear", &falqon::ref::melded_linear);
  m.impl("melded_linear_grad_input", &falqon::ref::melded_linear_grad_input);
  m.impl("melded_linear_backward", &falqon::ref::melded_linear_backward);
  m.impl("record_amax_", &falqon::ref::record_amax_);
  m.impl("meld_init", &falqon::ref::meld_init);
  m.impl("topk_update_", &falqon::ref::topk_update_);
  m.impl("topk_update_many_", &falqon::ref::topk_update_many_);
}
