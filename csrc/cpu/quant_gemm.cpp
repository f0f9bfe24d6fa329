// CPU kernel of the weight-only quantized linear layer at prompt sizes (M > 16): out = x @ dequantize(w)^T + bias
// with x quantized to int8 per block of 32 inputs exactly as the decode kernels quantize it (quant_linear.cpp:
// scale max|x| / 127, round half to even), so a prompt and a decode step compute the same function, and
//   out[m, n] = sum_blocks xs[m, b] * ws[n, b] * (sum_{k in b} qx[m, k] * u[n, k] - offset * sum_{k in b} qx[m, k])
// with the inner sums exact in int32 (u: the weight as the unsigned operand, u = q + offset) and the rest in fp32.
// Why integers: without native bf16 (AVX2 CPUs) the alternative is dequantizing into torch's fp32 GEMM, ~8 fp32
// MACs per FMA; u8 x s8 products do 16 per maddubs and 64 per AVX512-VNNI dpbusd (bench/NOTES.md).
//
// Blocking (GotoBLAS-like, K never split): the weight is repacked panel by panel, NR output rows at a time, into
// [blocks][8 quads][NR][4] bytes (quad j of block b = inputs b*32 + 4j .. 4j+3, so one vector load holds 4
// inputs of each of NR rows: one int32 lane per output row) and [blocks][NR] fp32 scales (int4: the group's,
// int8: the channel's). A thread packs a group of panels (~kGroupBytes, L2-resident), then for every tile of MR
// rows of x (in L1) runs the register micro-kernel over each panel of the group: MR x NR outputs accumulated in
// int32 over a block of 32 inputs, then scaled into fp32 accumulators, all over K in registers; outputs are written
// once. Paths (run time): VNNI (NR = 16, MR = 8; weights u8 = q + 8 / w + 128, one dpbusd per 4 inputs x 16
// rows), AVX2 (NR = 8, MR = 4; int4: the block's 8 maddubs summed in int16, at most 16 * 15 * 127 = 30480, then
// one madd; int8: maddubs(|w|, sign(x, w)), whose pairs stay within int16, then a madd each), portable loops
// (NR = 8) with the same sums.
// Threads: the panels split into one contiguous range per thread.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "cpu/kernel_utils.h"
#include "cpu/quant_block.h"
#include "cpu/quant_linear.h"
#include "cpu/vec_avx2.h"
#include "cpu/vec_avx512.h"

namespace phi_fast::cpu {
namespace {

constexpr int64_t kBlock = kActBlock;         // inputs per activation block (as the decode kernels)
constexpr int64_t kGroupBytes = 128 << 10;  // packed panel bytes a thread keeps in L2 for one sweep over x
constexpr double kMacsPerNs = 60.0;          // single-core integer MACs, for the thread estimate (rough)

enum class Isa { portable, avx2, vnni };

#ifdef PHI_FAST_CPU_AVX512
#define PHI_FAST_TARGET_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
#endif

Isa pick_isa() {
#ifdef PHI_FAST_CPU_AVX512
  static const bool vnni = avx512::enabled() && __builtin_cpu_supports("avx512vnni");
  if (vnni) return Isa::vnni;
#endif
#ifdef PHI_FAST_CPU_AVX2
  if (avx2::enabled()) return Isa::avx2;
#endif
  return Isa::portable;
}

// x quantized for one call: q [M, blocks * 32] (zeros past K), scale [M, blocks], start [M, blocks] =
// -offset * (the block's sum of q), the int32 sum's starting value that cancels the weights' offset.
struct GemmX {
  int64_t blocks = 0;
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> start;
};

template <typename T>
GemmX quantize_x(const T* x, int64_t x_stride, int64_t M, int64_t K, int offset, int num_threads) {
  GemmX gx;
  gx.blocks = (K + kBlock - 1) / kBlock;
  const int64_t blocks = gx.blocks, row = blocks * kBlock;
  gx.q.assign(M * row, 0);
  gx.scale.assign(M * blocks, 0.0f);
  gx.start.assign(M * blocks, 0);
  parallel_rows(M, stream_ns(6.0 * static_cast<double>(M) * row), num_threads, [&](int64_t begin, int64_t end) {
    std::vector<float> xf(row);
    for (int64_t m = begin; m < end; ++m) {
      std::fill(xf.begin(), xf.end(), 0.0f);
      load_row(xf.data(), x + m * x_stride, K);
      for (int64_t b = 0; b < blocks; ++b) {
        int8_t* q = gx.q.data() + m * row + b * kBlock;
        gx.scale[m * blocks + b] = quantize_block(xf.data() + b * kBlock, q);
        int32_t sum = 0;
        for (int i = 0; i < kBlock; ++i) sum += q[i];
        gx.start[m * blocks + b] = -offset * sum;
      }
    }
  });
  return gx;
}

// One packed panel of NR weight rows: bytes [blocks][8][NR][4], scales [blocks][NR].
struct Panel {
  const uint8_t* bytes;
  const float* scales;
};

// The 4 bytes at p as one uint32, and back.
inline uint32_t load4(const void* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline void store4(void* p, uint32_t v) { std::memcpy(p, &v, 4); }

// Packs rows [n0, n0 + rows) (rows <= NR; the rest zero) into bytes / scales, 4 inputs (one uint32) at a time.
// int4: the nibbles q + 8; int8: the signed bytes, or w + 128 (flip) for the VNNI kernel's unsigned operand.
void pack_panel(uint8_t* bytes, float* scales, int NR, const QuantWeight& w, int64_t n0, int64_t rows,
                int64_t blocks, bool flip) {
  std::memset(bytes, 0, blocks * kBlock * NR);
  std::fill(scales, scales + blocks * NR, 0.0f);
  const bool int4 = w.format == QuantFormat::int4;
  const int64_t kp = int4 ? (w.K + w.group_size - 1) / w.group_size * w.group_size : w.K;
  const int shift = int4 ? __builtin_ctzll(static_cast<uint64_t>(w.group_size)) : 0;
  const uint32_t flip_bits = flip ? 0x80808080u : 0u;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t n = n0 + r;
    uint8_t* dst = bytes + r * 4;  // quad j of block b at (b * 8 + j) * NR * 4
    if (int4) {
      const uint8_t* src = static_cast<const uint8_t*>(w.data) + n * (kp / 2);
      const uint16_t* s = w.group_scales() + n * (kp / w.group_size);
      for (int64_t b = 0; b < blocks; ++b) {
        for (int j = 0; j < 4; ++j) {  // quad j: low nibbles of bytes 4j..4j+3; quad j + 4: their high nibbles
          const uint32_t v = load4(src + b * 16 + 4 * j);
          store4(dst + (b * 8 + j) * NR * 4, v & 0x0F0F0F0Fu);
          store4(dst + (b * 8 + j + 4) * NR * 4, (v >> 4) & 0x0F0F0F0Fu);
        }
        scales[b * NR + r] = half_to_float(s[(b * kBlock) >> shift]);
      }
      continue;
    }
    const int8_t* src = static_cast<const int8_t*>(w.data) + n * w.K;
    const int64_t quads = w.K / 4;
    for (int64_t q = 0; q < quads; ++q) store4(dst + q * NR * 4, load4(src + 4 * q) ^ flip_bits);
    for (int64_t q = quads; q < blocks * 8; ++q) {  // the last inputs and the padding (w = 0) past K
      uint8_t quad[4] = {};
      for (int64_t i = 0; i < 4 && 4 * q + i < w.K; ++i) quad[i] = static_cast<uint8_t>(src[4 * q + i]);
      store4(dst + q * NR * 4, load4(quad) ^ flip_bits);
    }
    for (int64_t b = 0; b < blocks; ++b) scales[b * NR + r] = w.channel_scales()[n];
  }
}

// ---- micro-kernels: acc[m * NR + r] = out[m0 + m, n0 + r] before the bias, for m < MT ----

template <int NR>
void tile_portable(float* acc, int MT, const Panel& p, const GemmX& gx, int64_t m0, bool int4) {
  const int64_t blocks = gx.blocks, row = blocks * kBlock;
  for (int m = 0; m < MT; ++m) {
    float sum[NR] = {};
    const int8_t* xq = gx.q.data() + (m0 + m) * row;
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* wb = p.bytes + b * kBlock * NR;
      const float xs = gx.scale[(m0 + m) * blocks + b];
      for (int r = 0; r < NR; ++r) {
        int32_t dot = gx.start[(m0 + m) * blocks + b];
        for (int j = 0; j < 8; ++j) {
          for (int i = 0; i < 4; ++i) {
            const uint8_t u = wb[(j * NR + r) * 4 + i];
            dot += (int4 ? static_cast<int32_t>(u) : static_cast<int8_t>(u)) * xq[b * kBlock + 4 * j + i];
          }
        }
        sum[r] += static_cast<float>(dot) * (p.scales[b * NR + r] * xs);
      }
    }
    std::copy(sum, sum + NR, acc + m * NR);
  }
}

#ifdef PHI_FAST_CPU_AVX2
template <int MT, bool kInt4>
PHI_FAST_TARGET_AVX2 void tile_avx2(float* acc, const Panel& p, const GemmX& gx, int64_t m0) {
  constexpr int NR = 8;
  const int64_t blocks = gx.blocks, row = blocks * kBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 facc[MT];
  for (int m = 0; m < MT; ++m) facc[m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* wb = p.bytes + b * kBlock * NR;
    __m256i iacc[MT];  // int4: int16 pair sums over the whole block (16 products of <= 15 * 127: 30480 at most)
    for (int m = 0; m < MT; ++m) {
      iacc[m] = kInt4 ? _mm256_setzero_si256() : _mm256_set1_epi32(gx.start[(m0 + m) * blocks + b]);
    }
    for (int j = 0; j < 8; j += 2) {
      const __m256i w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + j * NR * 4));
      const __m256i w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + (j + 1) * NR * 4));
      if constexpr (kInt4) {
        for (int m = 0; m < MT; ++m) {
          const int8_t* xq = gx.q.data() + (m0 + m) * row + b * kBlock + 4 * j;
          const __m256i x0 = _mm256_set1_epi32(static_cast<int>(load4(xq)));
          const __m256i x1 = _mm256_set1_epi32(static_cast<int>(load4(xq + 4)));
          const __m256i d = _mm256_add_epi16(_mm256_maddubs_epi16(w0, x0), _mm256_maddubs_epi16(w1, x1));
          iacc[m] = _mm256_add_epi16(iacc[m], d);
        }
      } else {
        const __m256i a0 = _mm256_abs_epi8(w0), a1 = _mm256_abs_epi8(w1);
        for (int m = 0; m < MT; ++m) {
          const int8_t* xq = gx.q.data() + (m0 + m) * row + b * kBlock + 4 * j;
          const __m256i x0 = _mm256_sign_epi8(_mm256_set1_epi32(static_cast<int>(load4(xq))), w0);
          const __m256i x1 = _mm256_sign_epi8(_mm256_set1_epi32(static_cast<int>(load4(xq + 4))), w1);
          const __m256i d0 = _mm256_madd_epi16(_mm256_maddubs_epi16(a0, x0), ones);
          const __m256i d1 = _mm256_madd_epi16(_mm256_maddubs_epi16(a1, x1), ones);
          iacc[m] = _mm256_add_epi32(iacc[m], _mm256_add_epi32(d0, d1));
        }
      }
    }
    const __m256 ws = _mm256_loadu_ps(p.scales + b * NR);
    for (int m = 0; m < MT; ++m) {
      if constexpr (kInt4) {
        iacc[m] = _mm256_add_epi32(_mm256_madd_epi16(iacc[m], ones), _mm256_set1_epi32(gx.start[(m0 + m) * blocks + b]));
      }
      const __m256 s = _mm256_mul_ps(ws, _mm256_set1_ps(gx.scale[(m0 + m) * blocks + b]));
      facc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[m]), s, facc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) _mm256_storeu_ps(acc + m * NR, facc[m]);
}
#endif

#ifdef PHI_FAST_CPU_AVX512
template <int MT>
PHI_FAST_TARGET_VNNI void tile_vnni(float* acc, const Panel& p, const GemmX& gx, int64_t m0) {
  constexpr int NR = 16;
  const int64_t blocks = gx.blocks, row = blocks * kBlock;
  __m512 facc[MT];
  for (int m = 0; m < MT; ++m) facc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* wb = p.bytes + b * kBlock * NR;
    __m512i iacc[MT];
    for (int m = 0; m < MT; ++m) iacc[m] = _mm512_set1_epi32(gx.start[(m0 + m) * blocks + b]);
    for (int j = 0; j < 8; ++j) {
      const __m512i wv = _mm512_loadu_si512(wb + j * NR * 4);
      for (int m = 0; m < MT; ++m) {
        const __m512i xv = _mm512_set1_epi32(static_cast<int>(load4(gx.q.data() + (m0 + m) * row + b * kBlock + 4 * j)));
        iacc[m] = _mm512_dpbusd_epi32(iacc[m], wv, xv);
      }
    }
    const __m512 ws = _mm512_loadu_ps(p.scales + b * NR);
    for (int m = 0; m < MT; ++m) {
      const __m512 s = _mm512_mul_ps(ws, _mm512_set1_ps(gx.scale[(m0 + m) * blocks + b]));
      facc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[m]), s, facc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(acc + m * NR, facc[m]);
}
#endif

// The path's register tile: NR weight rows per panel, MR rows of x per micro-kernel call.
struct Shape {
  int NR, MR;
};

Shape shape_of(Isa isa) { return isa == Isa::vnni ? Shape{16, 8} : Shape{8, 4}; }

// Calls the micro-kernel for MT (1 .. MR) rows of x.
template <int MT>
void tile_fixed(Isa isa, float* acc, const Panel& p, const GemmX& gx, int64_t m0, bool int4) {
#ifdef PHI_FAST_CPU_AVX512
  if (isa == Isa::vnni) return tile_vnni<MT>(acc, p, gx, m0);
#endif
#ifdef PHI_FAST_CPU_AVX2
  if constexpr (MT <= 4) {
    if (isa == Isa::avx2) return int4 ? tile_avx2<MT, true>(acc, p, gx, m0) : tile_avx2<MT, false>(acc, p, gx, m0);
  }
#endif
  tile_portable<8>(acc, MT, p, gx, m0, int4);
}

void tile(Isa isa, int MT, float* acc, const Panel& p, const GemmX& gx, int64_t m0, bool int4) {
  switch (MT) {
    case 1: return tile_fixed<1>(isa, acc, p, gx, m0, int4);
    case 2: return tile_fixed<2>(isa, acc, p, gx, m0, int4);
    case 3: return tile_fixed<3>(isa, acc, p, gx, m0, int4);
    case 4: return tile_fixed<4>(isa, acc, p, gx, m0, int4);
    case 5: return tile_fixed<5>(isa, acc, p, gx, m0, int4);
    case 6: return tile_fixed<6>(isa, acc, p, gx, m0, int4);
    case 7: return tile_fixed<7>(isa, acc, p, gx, m0, int4);
    default: return tile_fixed<8>(isa, acc, p, gx, m0, int4);
  }
}

template <typename T>
void quant_gemm_kernel(T* out, const T* x, int64_t x_stride, const QuantWeight& w, const T* bias, int64_t M,
                       int num_threads) {
  const Isa isa = pick_isa();
  const Shape sh = shape_of(isa);
  const bool int4 = w.format == QuantFormat::int4;
  const bool flip = !int4 && isa == Isa::vnni;  // int8 weights as the unsigned operand: w + 128
  const GemmX gx = quantize_x(x, x_stride, M, w.K, int4 ? 8 : (flip ? 128 : 0), num_threads);
  const int64_t blocks = gx.blocks, panel_bytes = blocks * kBlock * sh.NR;
  const int64_t panels = (w.N + sh.NR - 1) / sh.NR;
  const int64_t group = std::max<int64_t>(1, kGroupBytes / panel_bytes);  // panels packed per sweep over x
  const double work_ns = static_cast<double>(M) * w.N * w.K / kMacsPerNs;
  parallel_rows(panels, work_ns, num_threads, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> bytes(group * panel_bytes);
    std::vector<float> scales(group * blocks * sh.NR), acc(sh.MR * sh.NR);
    for (int64_t p0 = begin; p0 < end; p0 += group) {
      const int64_t count = std::min(group, end - p0);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t n0 = (p0 + i) * sh.NR;
        pack_panel(bytes.data() + i * panel_bytes, scales.data() + i * blocks * sh.NR, sh.NR, w, n0,
                   std::min<int64_t>(sh.NR, w.N - n0), blocks, flip);
      }
      for (int64_t m0 = 0; m0 < M; m0 += sh.MR) {
        const int MT = static_cast<int>(std::min<int64_t>(sh.MR, M - m0));
        for (int64_t i = 0; i < count; ++i) {
          const Panel panel{bytes.data() + i * panel_bytes, scales.data() + i * blocks * sh.NR};
          tile(isa, MT, acc.data(), panel, gx, m0, int4);
          const int64_t n0 = (p0 + i) * sh.NR, rows = std::min<int64_t>(sh.NR, w.N - n0);
          for (int m = 0; m < MT; ++m) {
            T* o = out + (m0 + m) * w.N + n0;
            for (int64_t r = 0; r < rows; ++r) {
              const float v = acc[m * sh.NR + r];
              o[r] = from_float<T>(bias != nullptr ? v + to_float(bias[n0 + r]) : v);
            }
          }
        }
      }
    }
  });
}

}  // namespace

bool quant_gemm_enabled() {
#if defined(__x86_64__) && defined(__GNUC__)
  // AMX tiles multiply bf16 several times faster than any of these kernels: such CPUs keep torch's bf16 GEMM.
  static const bool enabled =
      !__builtin_cpu_supports("amx-bf16") && std::getenv("PHI_FAST_CPU_DEQUANT_PROMPTS") == nullptr;
#else
  static const bool enabled = std::getenv("PHI_FAST_CPU_DEQUANT_PROMPTS") == nullptr;
#endif
  return enabled;
}

void quant_gemm(void* out, const void* x, int64_t x_stride, const QuantWeight& w, const void* bias, int64_t M,
                DType dtype, int num_threads) {
  dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    quant_gemm_kernel(static_cast<T*>(out), static_cast<const T*>(x), x_stride, w, static_cast<const T*>(bias), M,
                      num_threads);
  });
}

}  // namespace phi_fast::cpu
