// Weight-only quantized linear layer: quant_linear (W8A16 / W4A16 GEMV and skinny GEMM for decode, M <= 16) and
// dequantize_rows (packed weights -> a dense tile, for ops.dequantize and the prompt path's GEMM). Launchers
// declared in csrc/cuda/quant_linear.h; formats in csrc/common/quant_weight.h.
//
// Math: w[n, k] = q[n, k] * scale (int8: fp32 scales[n]; int4: fp16 scales[n, k / G], q = nibble - 8), in fp32
//   exactly as the reference dequantizes (one rounding of q * scale); out[m, n] = sum_k x[m, k] * w[n, k] + bias[n]
//   with fp32 accumulation, rounded to x's dtype.
// Layouts: a weight row is a sequence of 16-byte chunks: int4 chunk c holds weights 32c .. 32c + 31 (byte i: weight
//   32c + i in the low nibble, 32c + 16 + i in the high one), int8 chunk c weights 16c .. 16c + 15. Only the chunks
//   that start below K are read (int4 rows may carry whole padding chunks up to Kp); weights at k >= K multiply
//   x = 0. Each chunk is read as one 16-byte load (or byte by byte when the rows are not 16-byte aligned: int8 with
//   K % 16 != 0, or a misaligned base) and taken apart 4 bytes (a word) at a time: an int4 word j gives weights
//   4j .. 4j + 3 and 16 + 4j .. 16 + 4j + 3 of the chunk, an int8 word weights 4j .. 4j + 3.
//   Nibbles and bytes become floats through the exponent trick (0x4B000000 | v is 2^23 + v), not I2F.
// Thread mapping (quant_linear): one block of up to 128 threads per kRows = 4 consecutive output rows; thread t
//   takes chunks t, t + blockDim, ... of the rows (all kRows rows at the same chunk: 4 independent 16-byte loads in
//   flight), dequantizes a word of each row into registers and multiplies it with the matching x of all M rows,
//   accumulating acc[m][r] in registers. The M rows of x share every weight load; x (at most 16 x K) is read through
//   L1. A warp_sum, then a sum over the block's warps in shared memory, gives out[m, n0 + r]; bias fused there.
// Thread mapping (dequantize_rows): one thread per (row, chunk), writing the chunk's 16 or 32 values with 4-wide
//   stores where the destination allows, scalar ones at the tail (k >= K is never written).
#include <algorithm>
#include <type_traits>

#include "cuda/kernel_utils.cuh"
#include "cuda/quant_linear.h"

namespace phi_fast::cuda {
namespace {

constexpr int kRows = 4;         // output rows per block
constexpr int kMaxThreads = 128;  // threads per block (4 warps)
constexpr int kMaxWarps = kMaxThreads / 32;

template <QuantFormat F>
struct Format;

template <>
struct Format<QuantFormat::int4> {
  static constexpr int kWeights = 32;  // per 16-byte chunk
  static constexpr int kPerWord = 8;
  // Position in the chunk of value i of word j.
  __device__ static constexpr int pos(int j, int i) { return i < 4 ? 4 * j + i : 16 + 4 * j + (i - 4); }
  // q of value i of a word, exactly, as a float: nibble - 8.
  __device__ static float value(uint32_t word, int i) {
    const uint32_t nibble = (word >> (8 * (i & 3) + 4 * (i >> 2))) & 0xFu;
    return __uint_as_float(0x4B000000u | nibble) - 8388616.0f;  // (2^23 + nibble) - (2^23 + 8)
  }
};

template <>
struct Format<QuantFormat::int8> {
  static constexpr int kWeights = 16;
  static constexpr int kPerWord = 4;
  __device__ static constexpr int pos(int j, int i) { return 4 * j + i; }
  __device__ static float value(uint32_t word, int i) {
    const uint32_t biased = ((word ^ 0x80808080u) >> (8 * i)) & 0xFFu;  // q + 128
    return __uint_as_float(0x4B000000u | biased) - 8388736.0f;          // (2^23 + q + 128) - (2^23 + 128)
  }
};

// The 16 bytes at p as 4 words: one 16-byte load when `vec` (p 16-byte aligned), else byte loads of the first
// `valid` bytes (the rest read as 0).
__device__ __forceinline__ void load_chunk(const uint8_t* p, bool vec, int valid, uint32_t (&words)[4]) {
  if (vec) {
    const uint4 v = *reinterpret_cast<const uint4*>(p);
    words[0] = v.x;
    words[1] = v.y;
    words[2] = v.z;
    words[3] = v.w;
    return;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    uint32_t word = 0;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      if (4 * j + b < valid) word |= static_cast<uint32_t>(p[4 * j + b]) << (8 * b);
    }
    words[j] = word;
  }
}

// x values at the positions of word j of the chunk starting at k0 (0 past K): 4-wide loads when `vec` (the chunk
// is whole and the row allows 4-element loads), else scalar.
template <QuantFormat F, typename T>
__device__ __forceinline__ void load_x(const T* row, int64_t k0, int j, int64_t K, bool vec,
                                       float (&xv)[Format<F>::kPerWord]) {
  using Fmt = Format<F>;
  if (vec) {
#pragma unroll
    for (int h = 0; h < Fmt::kPerWord / 4; ++h) {
      float part[4];
      load_f32<4>(row + k0 + Fmt::pos(j, 4 * h), part);
#pragma unroll
      for (int i = 0; i < 4; ++i) xv[4 * h + i] = part[i];
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < Fmt::kPerWord; ++i) {
    const int64_t k = k0 + Fmt::pos(j, i);
    xv[i] = k < K ? to_f32(row[k]) : 0.0f;
  }
}

// Bytes of chunk c that hold weights: all 16 for int4 (rows are whole runs), the rest of the row for int8's last.
template <QuantFormat F>
__device__ __forceinline__ int chunk_bytes(int64_t row_bytes, int64_t c) {
  return F == QuantFormat::int4 || row_bytes - c * 16 >= 16 ? 16 : static_cast<int>(row_bytes - c * 16);
}

// The scale of chunk c of row n: int8, the row's fp32 scale; int4, its group's fp16 scale.
template <QuantFormat F>
__device__ __forceinline__ float chunk_scale(const void* scales, int64_t n, int64_t groups, int64_t c, int shift) {
  if constexpr (F == QuantFormat::int4) {
    return __half2float(static_cast<const __half*>(scales)[n * groups + (c >> shift)]);
  } else {
    return static_cast<const float*>(scales)[n];
  }
}

struct GemvArgs {
  const uint8_t* qweight;  // [N, row_bytes]
  const void* scales;      // int8 fp32 [N]; int4 fp16 [N, groups]
  int64_t row_bytes;       // int8: K; int4: Kp / 2
  int64_t groups;          // int4: Kp / G
  int chunk_group_shift;   // int4: log2(G / 32), chunk c is in group c >> shift
  int64_t N, K, x_stride;
  int M;
  bool weight_vec, x_vec;  // 16-byte weight loads / 4-wide x loads allowed
};

template <typename T, QuantFormat F, int MT>
__global__ void __launch_bounds__(kMaxThreads) quant_linear_kernel(T* __restrict__ out, const T* __restrict__ x,
                                                                   const T* __restrict__ bias, GemvArgs a) {
  using Fmt = Format<F>;
  __shared__ float partial[kMaxWarps][MT * kRows];
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t chunks = (a.K + Fmt::kWeights - 1) / Fmt::kWeights;
  float acc[MT][kRows];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) acc[m][r] = 0.0f;
  }
  float row_scale[kRows];  // int8: per row, fixed
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    row_scale[r] = F == QuantFormat::int8 && n0 + r < a.N ? chunk_scale<F>(a.scales, n0 + r, 0, 0, 0) : 0.0f;
  }

  for (int64_t c = threadIdx.x; c < chunks; c += blockDim.x) {
    const int64_t k0 = c * Fmt::kWeights;
    const bool whole = k0 + Fmt::kWeights <= a.K;
    uint32_t words[kRows][4];
    float scale[kRows];
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const int64_t n = n0 + r < a.N ? n0 + r : a.N - 1;  // past N: a valid row, result dropped
      const uint8_t* p = a.qweight + n * a.row_bytes + c * 16;
      const int valid = chunk_bytes<F>(a.row_bytes, c);
      load_chunk(p, a.weight_vec && valid == 16, valid, words[r]);
      scale[r] = F == QuantFormat::int4 ? chunk_scale<F>(a.scales, n, a.groups, c, a.chunk_group_shift) : row_scale[r];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float w[kRows][Fmt::kPerWord];
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
#pragma unroll
        for (int i = 0; i < Fmt::kPerWord; ++i) w[r][i] = Fmt::value(words[r][j], i) * scale[r];
      }
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        if (m < a.M) {
          float xv[Fmt::kPerWord];
          load_x<F>(x + m * a.x_stride, k0, j, a.K, a.x_vec && whole, xv);
#pragma unroll
          for (int r = 0; r < kRows; ++r) {
#pragma unroll
            for (int i = 0; i < Fmt::kPerWord; ++i) acc[m][r] = fmaf(w[r][i], xv[i], acc[m][r]);
          }
        }
      }
    }
  }

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int m = 0; m < MT; ++m) {
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      const float v = warp_sum(acc[m][r]);
      if (lane == 0) partial[warp][m * kRows + r] = v;
    }
  }
  __syncthreads();
  const int num_warps = blockDim.x / 32;
  for (int i = threadIdx.x; i < a.M * kRows; i += blockDim.x) {
    const int m = i / kRows, r = i % kRows;
    const int64_t n = n0 + r;
    if (n >= a.N) continue;
    float sum = 0.0f;
    for (int wi = 0; wi < num_warps; ++wi) sum += partial[wi][i];
    if (bias != nullptr) sum += to_f32(bias[n]);
    out[m * a.N + n] = from_f32<T>(sum);
  }
}

struct DequantArgs {
  const uint8_t* qweight;
  const void* scales;  // as GemvArgs
  int64_t row_bytes, groups;
  int chunk_group_shift;
  int64_t K, n0, rows, dst_stride;
  bool weight_vec, dst_vec;  // 16-byte weight loads / 4-wide stores allowed
};

template <typename D, QuantFormat F>
__global__ void __launch_bounds__(kMaxThreads) dequantize_kernel(D* __restrict__ dst, DequantArgs a) {
  using Fmt = Format<F>;
  const int64_t chunks = (a.K + Fmt::kWeights - 1) / Fmt::kWeights;
  const int64_t total = a.rows * chunks;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = idx / chunks, c = idx - r * chunks;
    const int64_t n = a.n0 + r, k0 = c * Fmt::kWeights;
    const int valid = chunk_bytes<F>(a.row_bytes, c);
    uint32_t words[4];
    load_chunk(a.qweight + n * a.row_bytes + c * 16, a.weight_vec && valid == 16, valid, words);
    const float scale = chunk_scale<F>(a.scales, n, a.groups, c, a.chunk_group_shift);
    D* row = dst + r * a.dst_stride;
    const bool vec = a.dst_vec && k0 + Fmt::kWeights <= a.K;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      float v[Fmt::kPerWord];
#pragma unroll
      for (int i = 0; i < Fmt::kPerWord; ++i) v[i] = Fmt::value(words[j], i) * scale;
      if (vec) {
#pragma unroll
        for (int h = 0; h < Fmt::kPerWord / 4; ++h) {
          const float part[4] = {v[4 * h], v[4 * h + 1], v[4 * h + 2], v[4 * h + 3]};
          store_f32<4>(row + k0 + Fmt::pos(j, 4 * h), part);
        }
      } else {
#pragma unroll
        for (int i = 0; i < Fmt::kPerWord; ++i) {
          const int64_t k = k0 + Fmt::pos(j, i);
          if (k < a.K) row[k] = from_f32<D>(v[i]);
        }
      }
    }
  }
}

int log2_int(int64_t v) {
  int s = 0;
  while ((int64_t{1} << (s + 1)) <= v) ++s;
  return s;
}

// Calls f(std::integral_constant<QuantFormat, format>) so that kernels get the format as a template constant.
template <typename Fn>
void dispatch_format(QuantFormat format, Fn&& f) {
  if (format == QuantFormat::int4) {
    f(std::integral_constant<QuantFormat, QuantFormat::int4>{});
  } else {
    f(std::integral_constant<QuantFormat, QuantFormat::int8>{});
  }
}

int64_t row_bytes(const QuantWeight& w) {
  if (w.format == QuantFormat::int8) return w.K;
  const int64_t kp = (w.K + w.group_size - 1) / w.group_size * w.group_size;
  return kp / 2;
}

template <typename T, QuantFormat F, int MT>
void launch_gemv(T* out, const T* x, const T* bias, const GemvArgs& a, cudaStream_t stream) {
  const int64_t chunks = ceil_div(a.K, Format<F>::kWeights);
  const int threads = static_cast<int>(std::clamp<int64_t>(ceil_div(chunks, 32) * 32, 32, kMaxThreads));
  const dim3 grid(static_cast<unsigned>(ceil_div(a.N, kRows)));
  launch_kernel(quant_linear_kernel<T, F, MT>, grid, dim3(threads), 0, stream, out, x, bias, a);
}

}  // namespace

void quant_linear(void* out, const void* x, int64_t x_stride, const QuantWeight& w, const void* bias, int64_t M,
                  DType dtype, void* stream) {
  if (M <= 0 || w.N <= 0) return;
  if (M > kQuantLinearMaxRows) {
    throw std::invalid_argument("phi_fast CUDA quant_linear: M = " + std::to_string(M) + " rows of x, at most " +
                                std::to_string(kQuantLinearMaxRows) + " (more go through dequantize_rows + GEMM)");
  }
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    GemvArgs a{};
    a.qweight = static_cast<const uint8_t*>(w.data);
    a.scales = w.scales;
    a.row_bytes = row_bytes(w);
    a.groups = w.format == QuantFormat::int4 ? a.row_bytes * 2 / w.group_size : 1;
    a.chunk_group_shift = w.format == QuantFormat::int4 ? log2_int(w.group_size / 32) : 0;
    a.N = w.N;
    a.K = w.K;
    a.x_stride = x_stride;
    a.M = static_cast<int>(M);
    a.weight_vec = is_aligned(w.data, 16) && a.row_bytes % 16 == 0;
    a.x_vec = is_aligned(x, 4 * sizeof(T)) && x_stride % 4 == 0;
    T* o = static_cast<T*>(out);
    const T* xt = static_cast<const T*>(x);
    const T* b = static_cast<const T*>(bias);
    const cudaStream_t s = as_stream(stream);
    dispatch_format(w.format, [&](auto format) {
      constexpr QuantFormat F = decltype(format)::value;
      if (M == 1) {
        launch_gemv<T, F, 1>(o, xt, b, a, s);
      } else if (M <= 2) {
        launch_gemv<T, F, 2>(o, xt, b, a, s);
      } else if (M <= 4) {
        launch_gemv<T, F, 4>(o, xt, b, a, s);
      } else if (M <= 8) {
        launch_gemv<T, F, 8>(o, xt, b, a, s);
      } else {
        launch_gemv<T, F, 16>(o, xt, b, a, s);
      }
    });
  });
}

void dequantize_rows(void* dst, int64_t dst_stride, const QuantWeight& w, int64_t n0, int64_t rows,
                     DType dst_dtype, void* stream) {
  if (rows <= 0 || w.K <= 0) return;
  dispatch_dtype(dst_dtype, [&](auto tag) {
    using D = decltype(tag);
    DequantArgs a{};
    a.qweight = static_cast<const uint8_t*>(w.data);
    a.scales = w.scales;
    a.row_bytes = row_bytes(w);
    a.groups = w.format == QuantFormat::int4 ? a.row_bytes * 2 / w.group_size : 1;
    a.chunk_group_shift = w.format == QuantFormat::int4 ? log2_int(w.group_size / 32) : 0;
    a.K = w.K;
    a.n0 = n0;
    a.rows = rows;
    a.dst_stride = dst_stride;
    a.weight_vec = is_aligned(w.data, 16) && a.row_bytes % 16 == 0;
    a.dst_vec = is_aligned(dst, 4 * sizeof(D)) && dst_stride % 4 == 0;
    dispatch_format(w.format, [&](auto format) {
      constexpr QuantFormat F = decltype(format)::value;
      const int64_t total = rows * ceil_div(w.K, Format<F>::kWeights);
      const dim3 grid(static_cast<unsigned>(std::min<int64_t>(ceil_div(total, kMaxThreads), int64_t{1} << 20)));
      launch_kernel(dequantize_kernel<D, F>, grid, dim3(kMaxThreads), 0, as_stream(stream), static_cast<D*>(dst), a);
    });
  });
}

}  // namespace phi_fast::cuda
