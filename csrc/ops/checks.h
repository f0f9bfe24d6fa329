// Input validation and device dispatch shared by the tensor-facing ops (csrc/ops/*.cpp).
//
// Every op builds an OpContext from its main tensor (which fixes the device and the activations' dtype),
// checks each argument with check_arg (device, dtype, shape, strides), checks closed lists (head_dim,
// page_size), checks index values when the tensors are on the CPU (a bad index there would be an
// out-of-bounds access; on CUDA reading them would synchronize), then calls dispatch_device.
// Messages name the op, the argument and the bad value: "layernorm: weight must have shape [C] = [80], got [81]".
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "common/dtype.h"

#ifdef PHI_FAST_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#ifdef PHI_FAST_SIM
#include "sim/state.h"
#endif

#if defined(PHI_FAST_WITH_CUDA) || defined(PHI_FAST_SIM)
// Keeps its arguments in CUDA (and sim) builds, drops them otherwise (calls into phi_fast::cuda launchers).
#define PHI_FAST_CUDA_ONLY(...) __VA_ARGS__
#else
#define PHI_FAST_CUDA_ONLY(...)
#endif

namespace phi_fast::ops {

// torch's Python name of a dtype: "float32", "bfloat16", "uint8", ...
inline std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "float32";
    case at::kHalf: return "float16";
    case at::kBFloat16: return "bfloat16";
    case at::kDouble: return "float64";
    case at::kByte: return "uint8";
    case at::kInt: return "int32";
    case at::kLong: return "int64";
    default: return c10::toString(t);
  }
}

// The op being checked, its device and the dtype of its activations (from its main tensor).
struct OpContext {
  const char* op;
  at::Device device;
  at::ScalarType scalar_type;
  DType dtype;
};

inline DType kernel_dtype(const char* op, const char* name, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::f32;
    case at::kHalf: return DType::f16;
    case at::kBFloat16: return DType::bf16;
    default:
      TORCH_CHECK(false, op, ": ", name, " has unsupported dtype ", dtype_str(t),
                  " (supported: float32, float16, bfloat16)");
  }
}

// Checks the main tensor's device (cpu or cuda) and dtype (closed list) and records them. `activations`
// overrides the activations' dtype when it is not the main tensor's (patchify: uint8 pixels, float32 out).
inline OpContext make_context(const char* op, const char* name, const at::Tensor& t,
                              std::optional<at::ScalarType> activations = std::nullopt) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.device().is_cpu() || t.device().is_cuda(), op, ": ", name, " is on ", t.device(),
              "; phi_fast kernels run on cpu and cuda tensors");
  const at::ScalarType scalar_type = activations.value_or(t.scalar_type());
  return OpContext{op, t.device(), scalar_type, kernel_dtype(op, name, scalar_type)};
}

enum class Layout { any, unit_last_stride, contiguous };

// "[T, C] = [5, 80]" with -1 shown as "*".
inline std::string expected_shape_str(const char* names, const std::vector<int64_t>& shape) {
  std::string s = std::string(names) + " = [";
  for (size_t i = 0; i < shape.size(); ++i) {
    s += (i ? ", " : "") + (shape[i] < 0 ? std::string("*") : std::to_string(shape[i]));
  }
  return s + "]";
}

// Checks one tensor argument: defined, on ctx's device, of `dtype` (the activations' dtype unless given),
// of `shape` (-1 = any size; `names` spells the layout, e.g. "[T, C]") and of `layout`.
inline void check_arg(const OpContext& ctx, const char* name, const at::Tensor& t, const std::vector<int64_t>& shape,
                      const char* names, Layout layout, std::optional<at::ScalarType> dtype = std::nullopt) {
  TORCH_CHECK(t.defined(), ctx.op, ": ", name, " is undefined");
  TORCH_CHECK(t.device() == ctx.device, ctx.op, ": ", name, " is on ", t.device(), ", expected ", ctx.device,
              " like the other inputs");
  const at::ScalarType want = dtype.value_or(ctx.scalar_type);
  TORCH_CHECK(t.scalar_type() == want, ctx.op, ": ", name, " has dtype ", dtype_str(t.scalar_type()), ", expected ",
              dtype_str(want));
  bool shape_ok = t.dim() == static_cast<int64_t>(shape.size());
  for (int64_t i = 0; shape_ok && i < t.dim(); ++i) shape_ok = shape[i] < 0 || t.size(i) == shape[i];
  TORCH_CHECK(shape_ok, ctx.op, ": ", name, " must have shape ", expected_shape_str(names, shape), ", got ",
              t.sizes());
  if (layout == Layout::contiguous) {
    TORCH_CHECK(t.is_contiguous(), ctx.op, ": ", name, " must be contiguous, got strides ", t.strides(),
                " for shape ", t.sizes());
  } else if (layout == Layout::unit_last_stride) {
    TORCH_CHECK(t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1, ctx.op, ": ", name,
                " must have a unit-stride last dim, got strides ", t.strides(), " for shape ", t.sizes());
  }
}

inline void check_head_dim(const OpContext& ctx, int64_t head_dim) {
  TORCH_CHECK_VALUE(head_dim == 64 || head_dim == 80, ctx.op, ": unsupported head_dim ", head_dim,
                    " (supported: 64, 80)");
}

inline void check_page_size(const OpContext& ctx, int64_t page_size) {
  TORCH_CHECK_VALUE(page_size == 16 || page_size == 32, ctx.op, ": unsupported page_size ", page_size,
                    " (supported: 16, 32)");
}

// CPU only: cu_seqlens[0] = 0, non-decreasing, cu_seqlens[S] = total.
inline void check_cu_seqlens_values(const OpContext& ctx, const char* name, const at::Tensor& cu_seqlens,
                                    int64_t total) {
  const int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  const int64_t n = cu_seqlens.numel();
  TORCH_CHECK(cu[0] == 0, ctx.op, ": ", name, "[0] must be 0, got ", cu[0]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK(cu[i] >= cu[i - 1], ctx.op, ": ", name, " must be non-decreasing, got ", name, "[", i - 1,
                "] = ", cu[i - 1], " > ", name, "[", i, "] = ", cu[i]);
  }
  TORCH_CHECK(cu[n - 1] == total, ctx.op, ": ", name, "[-1] must equal the number of tokens ", total, ", got ",
              cu[n - 1]);
}

// Runs on_cpu() for CPU tensors; for CUDA tensors runs on_cuda(stream) under a device guard on the current
// stream and checks the launch. Builds without CUDA raise a clear error instead. The sim build (phi_fast/_sim.py)
// runs on_cuda for CPU tensors: the CUDA launchers and kernels execute under the SIMT emulator (csrc/sim).
template <typename OnCpu, typename OnCuda>
void dispatch_device(const OpContext& ctx, [[maybe_unused]] OnCpu&& on_cpu, [[maybe_unused]] OnCuda&& on_cuda) {
#ifdef PHI_FAST_SIM
  TORCH_CHECK(ctx.device.is_cpu(), ctx.op, ": the sim backend runs on cpu tensors, got ", ctx.device);
  on_cuda(nullptr);
  const int error = sim::take_last_error();
  TORCH_CHECK(error == 0, ctx.op, ": CUDA error: ", sim::error_string(error));
#else  // (so the sim build never instantiates on_cpu and needs no csrc/cpu)
  if (!ctx.device.is_cuda()) {
    on_cpu();
    return;
  }
#ifdef PHI_FAST_WITH_CUDA
  const c10::cuda::CUDAGuard guard(ctx.device);
  on_cuda(static_cast<void*>(c10::cuda::getCurrentCUDAStream(ctx.device.index()).stream()));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#else
  TORCH_CHECK(false, ctx.op, ": got CUDA tensors but phi_fast was built without CUDA; rebuild with a CUDA ",
              "build of torch and nvcc on PATH: pip install --no-build-isolation . (with PHI_FAST_SKIP_CUDA unset)");
#endif
#endif
}

}  // namespace phi_fast::ops
