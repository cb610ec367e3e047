// Torch binding of the bevt._C extension: registers the operator torch.ops.bevt.masks_.
//
// masks_(input, target, trace, job, input2, target2, trace2, job2, log_aspect, seed, step) fills caller-made
// bool tensors with BEiT block masks / BEVT tube masks for one or two jobs in one kernel launch
// (csrc/masking.cu). Python callers use bevt.ops.masking (backend="cuda"), which makes the tensors.
//   input:   bool (B, slots, H, W), contiguous, CUDA            (block masks: slots = 1)
//   target:  bool (B, slots * scale, H, W) or None               (tube jobs only)
//   trace:   int32 (B, cap, 3), zero-filled, or None             ((h, w, new cells) of each accepted block)
//   job:     [index_offset, stream, num_masking, min_patches, max_patches, exact, tube, len_min, len_max]
//   input2, target2, trace2, job2: a second job in the same launch (input2 None: no second job)
//   log_aspect: [lo, hi, lo2, hi2]; seed: the Philox key as a signed 64-bit int (bits as uint64); step: 0..2^32-1
#include <Python.h>

#include <optional>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "masking.h"

namespace {

constexpr int64_t kJobFields = 9;

// Numbers reach error messages as std::to_string strings, never through std::ostream: number formatting
// through an ostream compiled into this extension crashed (SIGSEGV in basic_ostream::_M_insert<long>, inside
// c10::str) when built with g++ 13.3 against torch 2.11 and run with libstdc++ 6.0.33 (seen 2026-11-22; the
// cause is not established). Strings and C strings through c10::str are fine.
std::string num(int64_t v) { return std::to_string(v); }

std::string shape(at::IntArrayRef sizes) {
  std::string out = "(";
  for (size_t i = 0; i < sizes.size(); ++i) out += (i ? ", " : "") + num(sizes[i]);
  return out + ")";
}

bevt::MaskJob make_job(const at::Tensor& input, const std::optional<at::Tensor>& target,
                       const std::optional<at::Tensor>& trace, at::IntArrayRef job, double lo, double hi,
                       const char* name) {
  TORCH_CHECK(static_cast<int64_t>(job.size()) == kJobFields, "masks_: ", name, " job must have ", num(kJobFields),
              " fields, got ", num(static_cast<int64_t>(job.size())));
  TORCH_CHECK(input.is_cuda(), "masks_: ", name, " input must be a CUDA tensor, got ", input.device().str());
  TORCH_CHECK(input.scalar_type() == at::kBool, "masks_: ", name, " input must be bool, got ",
              c10::toString(input.scalar_type()));
  TORCH_CHECK(input.dim() == 4, "masks_: ", name, " input must be (B, slots, H, W), got ", shape(input.sizes()));
  TORCH_CHECK(input.is_contiguous(), "masks_: ", name, " input must be contiguous");
  const int64_t B = input.size(0), S = input.size(1), H = input.size(2), W = input.size(3);
  for (int64_t k = 0; k < kJobFields; ++k)
    TORCH_CHECK(job[k] >= 0 && job[k] <= 0xffffffffLL, "masks_: ", name, " job field ", num(k), " out of range: ",
                num(job[k]));
  TORCH_CHECK(B <= 0x7fffffffLL, "masks_: ", name, " batch too large: ", num(B));
  constexpr int64_t max_side = bevt::kMaskMaxSide, max_slots = bevt::kMaskMaxSlots;
  TORCH_CHECK(H >= 2 && W >= 2 && H <= max_side && W <= max_side, "masks_: ", name, " grid must have sides in 2..",
              num(max_side), ", got ", num(H), "x", num(W));
  TORCH_CHECK(S >= 1 && S <= max_slots, "masks_: ", name, " slots must be in 1..", num(max_slots), ", got ", num(S));

  bevt::MaskJob j;
  j.input = reinterpret_cast<uint8_t*>(input.data_ptr<bool>());
  j.batch = static_cast<int>(B);
  j.H = static_cast<int>(H);
  j.W = static_cast<int>(W);
  j.slots = static_cast<int>(S);
  j.index_offset = static_cast<uint32_t>(job[0]);
  j.stream = static_cast<uint32_t>(job[1]);
  j.num_masking = static_cast<int>(job[2]);
  j.min_patches = static_cast<int>(job[3]);
  j.max_patches = static_cast<int>(job[4]);
  j.exact = job[5] != 0;
  j.tube = job[6] != 0;
  j.len_min = static_cast<int>(job[7]);
  j.len_max = static_cast<int>(job[8]);
  j.log_aspect_lo = static_cast<float>(lo);
  j.log_aspect_hi = static_cast<float>(hi);
  if (target.has_value()) {
    const at::Tensor& t = *target;
    TORCH_CHECK(t.device() == input.device(), "masks_: ", name, " target must be on ", input.device().str());
    TORCH_CHECK(t.scalar_type() == at::kBool && t.is_contiguous() && t.dim() == 4, "masks_: ", name,
                " target must be a contiguous bool (B, slots * scale, H, W) tensor");
    TORCH_CHECK(t.size(0) == B && t.size(2) == H && t.size(3) == W && t.size(1) >= S && t.size(1) % S == 0,
                "masks_: ", name, " target shape ", shape(t.sizes()), " does not fit input ", shape(input.sizes()));
    j.target = reinterpret_cast<uint8_t*>(t.data_ptr<bool>());
    j.scale = static_cast<int>(t.size(1) / S);
  }
  if (trace.has_value()) {
    const at::Tensor& t = *trace;
    TORCH_CHECK(t.device() == input.device() && t.scalar_type() == at::kInt && t.is_contiguous() && t.dim() == 3 &&
                    t.size(0) == B && t.size(2) == 3 && t.size(1) >= 1 && t.size(1) <= 0x7fffffffLL,
                "masks_: ", name, " trace must be a contiguous int32 (B, cap, 3) tensor on ", input.device().str());
    j.trace = t.data_ptr<int32_t>();
    j.trace_cap = static_cast<int>(t.size(1));
  }
  return j;
}

void masks_cuda(const at::Tensor& input, const std::optional<at::Tensor>& target,
                const std::optional<at::Tensor>& trace, at::IntArrayRef job, const std::optional<at::Tensor>& input2,
                const std::optional<at::Tensor>& target2, const std::optional<at::Tensor>& trace2,
                at::IntArrayRef job2, at::ArrayRef<double> log_aspect, int64_t seed, int64_t step) {
  TORCH_CHECK(log_aspect.size() == 4, "masks_: log_aspect must have 4 values, got ",
              num(static_cast<int64_t>(log_aspect.size())));
  TORCH_CHECK(step >= 0 && step <= 0xffffffffLL, "masks_: step must be in [0, 2^32), got ", num(step));
  bevt::MaskParams p;
  p.seed = static_cast<uint64_t>(seed);
  p.step = static_cast<uint32_t>(step);
  p.job[0] = make_job(input, target, trace, job, log_aspect[0], log_aspect[1], "job 1");
  if (input2.has_value()) {
    TORCH_CHECK(input2->device() == input.device(), "masks_: both jobs must be on one device, got ",
                input.device().str(), " and ", input2->device().str());
    p.job[1] = make_job(*input2, target2, trace2, job2, log_aspect[2], log_aspect[3], "job 2");
  } else {
    TORCH_CHECK(!target2.has_value() && !trace2.has_value(), "masks_: target2/trace2 given without input2");
  }
  const c10::cuda::CUDAGuard guard(input.device());
  const char* why = nullptr;
  const cudaError_t err = bevt::launch_masks(p, c10::cuda::getCurrentCUDAStream().stream(), &why);
  TORCH_CHECK(err == cudaSuccess, "masks_: ", why != nullptr ? why : cudaGetErrorString(err));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(bevt, m) {
  m.def(
      "masks_(Tensor(a!) input, Tensor(b!)? target, Tensor(c!)? trace, int[] job, Tensor(d!)? input2, "
      "Tensor(e!)? target2, Tensor(f!)? trace2, int[] job2, float[] log_aspect, int seed, int step) -> ()");
}

TORCH_LIBRARY_IMPL(bevt, CUDA, m) { m.impl("masks_", &masks_cuda); }

// A bare Python module (no pybind11): importing it runs the registrations above.
#define BEVT_CONCAT_(a, b) a##b
#define BEVT_CONCAT(a, b) BEVT_CONCAT_(a, b)
#define BEVT_STR_(x) #x
#define BEVT_STR(x) BEVT_STR_(x)

PyMODINIT_FUNC BEVT_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, BEVT_STR(TORCH_EXTENSION_NAME),
                               "bevt CUDA kernels; importing registers the operators torch.ops.bevt.*", -1,
                               nullptr};
  return PyModule_Create(&module);
}
