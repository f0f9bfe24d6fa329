// SIMT emulator (csrc/sim): CUDA's vector types (uint3, dim3, float4, ...) in the global namespace, as
// <vector_types.h> declares them, with the alignment of the real types.
#pragma once

struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return {x, y, z}; }
};

#define PHI_FAST_SIM_VECTOR_TYPES(T, name)                                                          \
  struct alignas(2 * sizeof(T)) name##2 { T x, y; };                                                \
  struct name##3 { T x, y, z; };                                                                     \
  struct alignas(4 * sizeof(T)) name##4 { T x, y, z, w; };                                          \
  inline name##2 make_##name##2(T x, T y) { return {x, y}; }                                         \
  inline name##4 make_##name##4(T x, T y, T z, T w) { return {x, y, z, w}; }

PHI_FAST_SIM_VECTOR_TYPES(float, float)
PHI_FAST_SIM_VECTOR_TYPES(int, int)
PHI_FAST_SIM_VECTOR_TYPES(short, short)
PHI_FAST_SIM_VECTOR_TYPES(unsigned short, ushort)
PHI_FAST_SIM_VECTOR_TYPES(unsigned char, uchar)
#undef PHI_FAST_SIM_VECTOR_TYPES

struct alignas(8) uint2 {
  unsigned int x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
inline uint2 make_uint2(unsigned int x, unsigned int y) { return {x, y}; }
inline uint3 make_uint3(unsigned int x, unsigned int y, unsigned int z) { return {x, y, z}; }
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }
