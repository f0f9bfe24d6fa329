// SIMT emulator (csrc/sim): bodies for the inline-PTX wrappers (csrc/cuda/ptx.cuh) -- cp.async with its groups,
// ldmatrix.x4 (.trans) and mma.sync.m16n8k16 (bf16/f16 -> f32) -- written from the PTX ISA's fragment tables
// ("Matrix Fragments for mma.m16n8k16", "ldmatrix") as warp-collective operations.
//
// Fragment maps, lane = 4 * g + t (g = groupID = lane / 4, t = threadID_in_group = lane % 4); a 32-bit register
// holds two 16-bit elements, the lower-indexed one in the low half:
//   A (16 x 16, row): a0 = A[g][2t, 2t+1], a1 = A[g+8][2t, 2t+1], a2 = A[g][2t+8, 2t+9], a3 = A[g+8][2t+8, 2t+9]
//   B (16 x 8, col):  b0 = B[2t, 2t+1][g], b1 = B[2t+8, 2t+9][g]
//   C, D (16 x 8, f32): c0, c1 = C[g][2t, 2t+1], c2, c3 = C[g+8][2t, 2t+1]
//   ldmatrix .x4: lanes 8i..8i+7 give the row addresses of 8 x 8 matrix i (16 bytes per row); lane receives
//     r[i] = M_i[g][2t, 2t+1], or with .trans r[i] = (M_i[2t][g], M_i[2t+1][g]).
// The mma sums the 16 products of each output in k order in fp32 (the tensor cores' order is not specified).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/float_convert.h"
#include "sim/runtime.h"

namespace phi_fast::sim {

// cp.async.cg.shared.global [dst], [src], 16, src_size: queued in the thread's open group; lands at wait_group.
inline void cp_async(void* dst, const void* src, uint32_t bytes, uint32_t src_bytes,
                     const Location& loc = Location::current()) {
  check_shared(dst, bytes, "cp.async destination", loc);
  if (reinterpret_cast<uintptr_t>(dst) % bytes != 0 || reinterpret_cast<uintptr_t>(src) % bytes != 0) {
    fault("cp.async at " + where(loc) + ": addresses must be aligned to the copy size " + std::to_string(bytes));
  }
  this_thread().open_copies.push_back({dst, src, bytes, src_bytes});
}

inline void cp_async_commit() {
  Thread& t = this_thread();
  t.copy_groups.push_back(std::move(t.open_copies));
  t.open_copies.clear();
}

// cp.async.wait_group n: every committed group but the newest n has landed.
inline void cp_async_wait(int n) {
  Thread& t = this_thread();
  while (static_cast<int>(t.copy_groups.size()) > n) {
    for (const AsyncCopy& c : t.copy_groups.front()) perform(c);
    t.copy_groups.erase(t.copy_groups.begin());
  }
}

inline Payload pointer_payload(const void* p) {
  Payload in{};
  std::memcpy(in.w, &p, sizeof p);
  return in;
}

inline const unsigned char* payload_pointer(const Payload& in) {
  const unsigned char* p;
  std::memcpy(&p, in.w, sizeof p);
  return p;
}

inline uint16_t element16(const unsigned char* row, int col) {
  uint16_t v;
  std::memcpy(&v, row + 2 * col, 2);
  return v;
}

template <bool kTrans>
void combine_ldmatrix_x4(Thread* lanes, uint32_t /*mask*/, Payload* out) {
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4;
    const int t = lane % 4;
    for (int i = 0; i < 4; ++i) {
      uint32_t lo, hi;
      if (kTrans) {
        lo = element16(payload_pointer(lanes[8 * i + 2 * t].in), g);
        hi = element16(payload_pointer(lanes[8 * i + 2 * t + 1].in), g);
      } else {
        const unsigned char* row = payload_pointer(lanes[8 * i + g].in);
        lo = element16(row, 2 * t);
        hi = element16(row, 2 * t + 1);
      }
      out[lane].w[i] = lo | (hi << 16);
    }
  }
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: p is this lane's row address.
inline void ldmatrix_x4(uint32_t (&r)[4], const void* p, bool trans, const Location& loc = Location::current()) {
  check_shared(p, 16, trans ? "ldmatrix.x4.trans" : "ldmatrix.x4", loc);
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) fault("ldmatrix at " + where(loc) + ": row address not 16-byte aligned");
  const Payload& out = collective(0xffffffffu, trans ? "ldmatrix.x4.trans" : "ldmatrix.x4", pointer_payload(p),
                                  trans ? &combine_ldmatrix_x4<true> : &combine_ldmatrix_x4<false>, loc);
  for (int i = 0; i < 4; ++i) r[i] = out.w[i];
}

inline float half_bits_to_float(uint16_t h, bool bf16) { return bf16 ? bf16_to_float(h) : half_to_float(h); }

template <bool kBf16>
void combine_mma_16816(Thread* lanes, uint32_t /*mask*/, Payload* out) {
  float a[16][16], b[16][8], c[16][8];
  const auto lo = [](uint32_t r) { return half_bits_to_float(static_cast<uint16_t>(r & 0xFFFFu), kBf16); };
  const auto hi = [](uint32_t r) { return half_bits_to_float(static_cast<uint16_t>(r >> 16), kBf16); };
  for (int lane = 0; lane < 32; ++lane) {
    const uint32_t* w = lanes[lane].in.w;  // a0..a3, b0, b1, c0..c3
    const int g = lane / 4;
    const int t = lane % 4;
    for (int half = 0; half < 2; ++half) {  // a0/a1 hold columns 2t.., a2/a3 columns 2t+8..
      a[g][2 * t + 8 * half] = lo(w[2 * half]);
      a[g][2 * t + 1 + 8 * half] = hi(w[2 * half]);
      a[g + 8][2 * t + 8 * half] = lo(w[2 * half + 1]);
      a[g + 8][2 * t + 1 + 8 * half] = hi(w[2 * half + 1]);
      b[2 * t + 8 * half][g] = lo(w[4 + half]);
      b[2 * t + 1 + 8 * half][g] = hi(w[4 + half]);
    }
    float cf[4];
    std::memcpy(cf, w + 6, sizeof cf);
    c[g][2 * t] = cf[0];
    c[g][2 * t + 1] = cf[1];
    c[g + 8][2 * t] = cf[2];
    c[g + 8][2 * t + 1] = cf[3];
  }
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4;
    const int t = lane % 4;
    const int rows[4] = {g, g, g + 8, g + 8};
    const int cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    float d[4];
    for (int e = 0; e < 4; ++e) {
      float acc = c[rows[e]][cols[e]];
      for (int k = 0; k < 16; ++k) acc = std::fma(a[rows[e]][k], b[k][cols[e]], acc);
      d[e] = acc;
    }
    std::memcpy(out[lane].w, d, sizeof d);
  }
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32: d += a * b for the warp's fragments.
template <bool kBf16>
void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
               const Location& loc = Location::current()) {
  Payload in{};
  std::memcpy(in.w, a, 16);
  in.w[4] = b0;
  in.w[5] = b1;
  std::memcpy(in.w + 6, d, 16);
  const Payload& out = collective(0xffffffffu, kBf16 ? "mma.m16n8k16.bf16" : "mma.m16n8k16.f16", in,
                                  &combine_mma_16816<kBf16>, loc);
  std::memcpy(d, out.w, 16);
}

}  // namespace phi_fast::sim
