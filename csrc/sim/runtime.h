// SIMT emulator (csrc/sim): runs CUDA kernels, compiled by the host C++ compiler, on the CPU.
//
// Execution model. A launch runs its blocks one after another (in the schedule's order, csrc/sim/state.h). A
// block's threads are cooperative fibers in the calling OS thread: each runs until it reaches a synchronization
// point (__syncthreads, a warp collective) or exits, then the scheduler runs the next ready thread, so nothing
// inside the emulator races. The next thread is always the ready one that comes first in the schedule's order
// (forward: lowest index), so the first warp runs through all its warp collectives up to its next __syncthreads
// before the next warp starts: a thread or warp races as far ahead of the others as synchronization allows, and the
// opposite order makes the others race ahead of it. When no thread is ready, either every live thread waits at the
// same __syncthreads (all are released; a random order is redrawn) or the block is stuck, which is an error naming
// who waits where. Warp collectives (shuffles, votes, ldmatrix, mma) complete when the last lane named in the mask
// arrives: it combines every lane's input once and releases the others, who read their result.
//
// What is checked (each a sim::Fault with the block, thread and source line; never a hang): a __syncthreads that
// not every live thread reaches (threads at different barriers, or stuck at a warp collective); a warp collective
// whose mask names lanes that exited, do not exist, or wait elsewhere; lanes of one collective with different
// masks or at different collectives; shuffles that read a lane outside the mask; __shared__ arrays declared
// differently by the threads of a block, writes past their ends (guard bytes; ASan builds use exact-size heap
// allocations instead), ldmatrix / cp.async addresses outside every __shared__ array; more than 48 KB of static
// shared memory. Shared memory starts every block filled with 0xFF bytes (NaN in every float type), so reading
// what no thread wrote gives NaN; cp.async copies land only at cp.async.wait_group, so a missing wait reads
// poison. Global memory is plain host memory: out-of-bounds accesses are caught by AddressSanitizer builds.
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <new>
#include <source_location>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define PHI_FAST_SIM_ASAN 1
#else
#define PHI_FAST_SIM_ASAN 0
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include "sim/state.h"
#include "sim/vector_types.h"

// ---- fiber switch (x86-64 System V): saves callee-saved registers + MXCSR/x87 control word on the current
// stack, stores the stack pointer in *save_sp, continues on load_sp. A fresh fiber starts in the trampoline,
// which calls r12(rbx). Both live in one COMDAT group so every translation unit may carry them.
#if defined(__x86_64__)
extern "C" void phi_fast_sim_switch(void** save_sp, void* load_sp);
extern "C" void phi_fast_sim_trampoline();
__asm__(
    ".pushsection .text.phi_fast_sim_switch,\"axG\",@progbits,phi_fast_sim_switch,comdat\n"
    ".globl phi_fast_sim_switch\n.hidden phi_fast_sim_switch\n.type phi_fast_sim_switch,@function\n"
    "phi_fast_sim_switch:\n"
    "  pushq %rbp\n  pushq %rbx\n  pushq %r12\n  pushq %r13\n  pushq %r14\n  pushq %r15\n"
    "  subq $8, %rsp\n  stmxcsr (%rsp)\n  fnstcw 4(%rsp)\n"
    "  movq %rsp, (%rdi)\n  movq %rsi, %rsp\n"
    "  ldmxcsr (%rsp)\n  fldcw 4(%rsp)\n  addq $8, %rsp\n"
    "  popq %r15\n  popq %r14\n  popq %r13\n  popq %r12\n  popq %rbx\n  popq %rbp\n"
    "  ret\n"
    ".size phi_fast_sim_switch, .-phi_fast_sim_switch\n"
    ".globl phi_fast_sim_trampoline\n.hidden phi_fast_sim_trampoline\n.type phi_fast_sim_trampoline,@function\n"
    "phi_fast_sim_trampoline:\n"
    "  movq %rbx, %rdi\n  callq *%r12\n  ud2\n"
    ".size phi_fast_sim_trampoline, .-phi_fast_sim_trampoline\n"
    ".popsection\n");
#endif

namespace phi_fast::sim {

// An error the emulator found in a kernel (or in its launch).
struct Fault : std::runtime_error {
  using std::runtime_error::runtime_error;
};

using Location = std::source_location;

inline std::string where(const Location& loc) {
  std::string file = loc.file_name();
  const size_t csrc = file.rfind("csrc/");
  if (csrc != std::string::npos) file = file.substr(csrc);
  return file + ":" + std::to_string(loc.line());
}

inline std::string hex(uint32_t v) {
  char buf[16];
  std::snprintf(buf, sizeof buf, "0x%08x", v);
  return buf;
}

// Lanes of a mask as "0-3, 7".
inline std::string lanes_str(uint32_t mask) {
  std::string s;
  for (int i = 0; i < 32;) {
    if (!((mask >> i) & 1u)) {
      ++i;
      continue;
    }
    int j = i;
    while (j + 1 < 32 && ((mask >> (j + 1)) & 1u)) ++j;
    s += (s.empty() ? "" : ", ") + std::to_string(i) + (j > i ? "-" + std::to_string(j) : "");
    i = j + 1;
  }
  return s.empty() ? "none" : s;
}

// What one lane hands to a warp collective and gets back (shuffle value, vote, ldmatrix address, mma fragments).
struct Payload {
  uint32_t w[12];
};

enum class State : uint8_t { ready, at_barrier, at_collective, exited };

struct AsyncCopy {
  void* dst;
  const void* src;
  uint32_t bytes;
  uint32_t src_bytes;  // < bytes: the rest is zero-filled (cp.async's src-size)
};

struct Block;

struct Thread {
  void* sp = nullptr;  // saved stack pointer while switched out
  void* fake_stack = nullptr;
  char* stack = nullptr;
  size_t stack_size = 0;
#if !defined(__x86_64__)
  ucontext_t context;
#endif
  Block* block = nullptr;
  uint3 thread_idx{0, 0, 0};
  int linear = 0;
  int lane = 0;
  int warp = 0;
  State state = State::ready;
  Location at;            // the barrier or collective it waits at
  const char* what = "";  // which collective
  uint32_t mask = 0;
  Payload in{};
  int shared_decls = 0;  // __shared__ declarations this thread has passed
  std::vector<std::vector<AsyncCopy>> copy_groups;  // committed cp.async groups, oldest first
  std::vector<AsyncCopy> open_copies;               // issued, not yet committed
};

struct Warp {
  uint32_t present = 0;  // lanes that exist (blockDim need not be a multiple of 32)
  uint32_t exited = 0;
  uint32_t waiting = 0;  // lanes at a warp collective
  Payload out[32];
};

// One __shared__ array of a launch: the first thread of each block that reaches declaration k claims slot k.
struct SharedSlot {
  const char* name = "";
  const char* file = "";
  int line = 0;
  size_t bytes = 0;
  unsigned char* raw = nullptr;  // guard + data + guard (data only under ASan)
  unsigned char* data = nullptr;
};

constexpr size_t kGuard = PHI_FAST_SIM_ASAN ? 0 : 64;
constexpr unsigned char kGuardByte = 0xA5;
constexpr unsigned char kPoisonByte = 0xFF;
constexpr size_t kStaticSharedLimit = 48 * 1024;         // per block, static __shared__ (sm_90)
constexpr size_t kDynamicSharedDefault = 48 * 1024;      // without cudaFuncSetAttribute
constexpr size_t kSharedOptinLimit = 227 * 1024;         // cudaDevAttrMaxSharedMemoryPerBlockOptin on sm_90
constexpr int kMaxThreadsPerBlock = 1024;

inline void free_slot(SharedSlot& s) {
  if (s.raw != nullptr) ::operator delete[](s.raw, std::align_val_t(64));
  s.raw = s.data = nullptr;
}

inline void alloc_slot(SharedSlot& s, size_t bytes) {
  free_slot(s);
  s.bytes = bytes;
  s.raw = static_cast<unsigned char*>(::operator new[](bytes + 2 * kGuard, std::align_val_t(64)));
  s.data = s.raw + kGuard;
}

inline void poison_slot(SharedSlot& s) {
  std::memset(s.data, kPoisonByte, s.bytes);
  if (kGuard) {
    std::memset(s.raw, kGuardByte, kGuard);
    std::memset(s.data + s.bytes, kGuardByte, kGuard);
  }
}

// First guard byte that changed, as an offset from the array's start (0 if intact).
inline long damaged_guard(const SharedSlot& s) {
  for (size_t i = 0; i < kGuard; ++i) {
    if (s.data[s.bytes + i] != kGuardByte) return static_cast<long>(s.bytes + i);
  }
  for (size_t i = kGuard; i-- > 0;) {
    if (s.raw[i] != kGuardByte) return static_cast<long>(i) - static_cast<long>(kGuard);
  }
  return 0;
}

struct Block {
  uint3 block_idx{0, 0, 0};
  dim3 block_dim;
  dim3 grid_dim;
  int num_threads = 0;
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  int live = 0;
  std::vector<int> order;     // thread indices in the schedule's order
  std::vector<int> position;  // position of each thread in `order`
  size_t cursor = 0;          // no thread before order[cursor] is ready
  void (*body)(void*) = nullptr;
  void* body_ctx = nullptr;
  void* scheduler_sp = nullptr;
  void* scheduler_fake_stack = nullptr;
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
  std::string fault;  // set by a fiber; the scheduler throws it
  std::vector<SharedSlot> slots;  // static __shared__ arrays (kept across blocks of a launch)
  size_t claimed = 0;             // slots claimed in the current block
  SharedSlot dynamic;             // dynamic shared memory of the launch
  uint64_t rng = 0;

  ~Block() {
    for (SharedSlot& s : slots) free_slot(s);
    free_slot(dynamic);
  }
};

inline thread_local Thread* g_thread = nullptr;
inline thread_local Block* g_block = nullptr;

inline Thread& this_thread() { return *g_thread; }
inline Block& this_block() { return *g_block; }

inline std::string thread_str(const Thread& t) {
  return "thread (" + std::to_string(t.thread_idx.x) + ", " + std::to_string(t.thread_idx.y) + ", " +
         std::to_string(t.thread_idx.z) + ")";
}

inline std::string block_str(const Block& b) {
  return "block (" + std::to_string(b.block_idx.x) + ", " + std::to_string(b.block_idx.y) + ", " +
         std::to_string(b.block_idx.z) + ")";
}

// ---- fibers -------------------------------------------------------------------------------------------------

inline size_t fiber_stack_bytes() { return PHI_FAST_SIM_ASAN ? (1u << 20) : (256u << 10); }

// Switches from the running fiber back to the scheduler; returns when the scheduler resumes it.
inline void yield_fiber(Thread& t, bool final = false) {
  Block& b = *t.block;
#if PHI_FAST_SIM_ASAN
  __sanitizer_start_switch_fiber(final ? nullptr : &t.fake_stack, b.scheduler_stack_bottom, b.scheduler_stack_size);
#else
  (void)final;
#endif
#if defined(__x86_64__)
  phi_fast_sim_switch(&t.sp, b.scheduler_sp);
#else
  swapcontext(&t.context, static_cast<ucontext_t*>(b.scheduler_sp));
#endif
#if PHI_FAST_SIM_ASAN
  __sanitizer_finish_switch_fiber(t.fake_stack, &b.scheduler_stack_bottom, &b.scheduler_stack_size);
#endif
}

// Ends the running fiber after an error: records the first fault of the block and never returns.
[[noreturn]] inline void fault(const std::string& message) {
  Thread& t = this_thread();
  Block& b = *t.block;
  if (b.fault.empty()) b.fault = block_str(b) + " " + thread_str(t) + ": " + message;
  for (;;) yield_fiber(t, true);
}

inline void finish_thread(Thread& t);

inline void fiber_main(Thread* t) {
  Block& b = *t->block;
#if PHI_FAST_SIM_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_stack_bottom, &b.scheduler_stack_size);
#endif
  try {
    b.body(b.body_ctx);
  } catch (const std::exception& e) {
    fault(std::string("exception in the kernel: ") + e.what());
  }
  finish_thread(*t);
  for (;;) yield_fiber(*t, true);
}

#if !defined(__x86_64__)
inline void fiber_entry_ucontext(unsigned hi, unsigned lo) {
  fiber_main(reinterpret_cast<Thread*>((static_cast<uintptr_t>(hi) << 32) | lo));
}
#endif

// Fiber stacks, reused across launches: mapped with a guard page below, so an overflow faults.
inline std::vector<char*>& stack_pool() {
  static thread_local std::vector<char*> pool;
  return pool;
}

inline char* take_stack() {
  auto& pool = stack_pool();
  if (!pool.empty()) {
    char* s = pool.back();
    pool.pop_back();
    return s;
  }
  const size_t page = 4096;
  void* m = mmap(nullptr, fiber_stack_bytes() + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) throw Fault("phi_fast sim: cannot map a fiber stack");
  mprotect(m, page, PROT_NONE);
  return static_cast<char*>(m) + page;
}

// A stack whose fiber was abandoned (after a fault) may hold poisoned ASan frames: it is unmapped, not reused.
inline void drop_stack(char* s) { munmap(s - 4096, fiber_stack_bytes() + 4096); }

inline void start_fiber(Thread& t) {
  if (t.stack == nullptr) {
    t.stack = take_stack();
    t.stack_size = fiber_stack_bytes();
  }
#if defined(__x86_64__)
  auto* top = reinterpret_cast<uintptr_t*>(t.stack + t.stack_size);
  uintptr_t* sp = top - 8;  // 64 bytes: control words, r15, r14, r13, r12, rbx, rbp, return address
  const uint32_t mxcsr = 0x1F80;
  const uint16_t fpcw = 0x037F;
  std::memset(sp, 0, 8);
  std::memcpy(sp, &mxcsr, 4);
  std::memcpy(reinterpret_cast<char*>(sp) + 4, &fpcw, 2);
  sp[1] = sp[2] = sp[3] = 0;
  sp[4] = reinterpret_cast<uintptr_t>(&fiber_main);  // r12
  sp[5] = reinterpret_cast<uintptr_t>(&t);           // rbx
  sp[6] = 0;                                         // rbp
  sp[7] = reinterpret_cast<uintptr_t>(&phi_fast_sim_trampoline);
  t.sp = sp;
#else
  getcontext(&t.context);
  t.context.uc_stack.ss_sp = t.stack;
  t.context.uc_stack.ss_size = t.stack_size;
  t.context.uc_link = nullptr;
  const auto p = reinterpret_cast<uintptr_t>(&t);
  makecontext(&t.context, reinterpret_cast<void (*)()>(&fiber_entry_ucontext), 2, static_cast<unsigned>(p >> 32),
              static_cast<unsigned>(p & 0xFFFFFFFFu));
#endif
}

inline void resume(Block& b, Thread& t) {
  g_thread = &t;
#if PHI_FAST_SIM_ASAN
  __sanitizer_start_switch_fiber(&b.scheduler_fake_stack, t.stack, t.stack_size);
#endif
#if defined(__x86_64__)
  phi_fast_sim_switch(&b.scheduler_sp, t.sp);
#else
  ucontext_t here;
  b.scheduler_sp = &here;
  swapcontext(&here, &t.context);
#endif
#if PHI_FAST_SIM_ASAN
  __sanitizer_finish_switch_fiber(b.scheduler_fake_stack, nullptr, nullptr);
#endif
  g_thread = nullptr;
}

// ---- shared memory --------------------------------------------------------------------------------------------

// Whether [p, p + bytes) lies inside one __shared__ array of the running block.
inline bool in_shared(const void* p, size_t bytes) {
  const Block& b = this_block();
  const auto* c = static_cast<const unsigned char*>(p);
  for (size_t i = 0; i < b.claimed; ++i) {
    const SharedSlot& s = b.slots[i];
    if (c >= s.data && c + bytes <= s.data + s.bytes) return true;
  }
  return b.dynamic.data != nullptr && c >= b.dynamic.data && c + bytes <= b.dynamic.data + b.dynamic.bytes;
}

inline void check_shared(const void* p, size_t bytes, const char* what, const Location& loc) {
  if (!in_shared(p, bytes)) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%p", p);
    fault(std::string(what) + " at " + where(loc) + ": " + std::to_string(bytes) + " bytes at " + buf +
          " are not inside a __shared__ array of the block");
  }
}

// The storage of a `__shared__ T name[N]...` declaration (csrc/sim's build rewrites those declarations into
// calls of shared_array): every thread of the block gets the same array, poisoned at the block's start.
inline void* shared_storage(size_t bytes, const char* name, const char* file, int line) {
  Thread& t = this_thread();
  Block& b = *t.block;
  const size_t k = static_cast<size_t>(t.shared_decls++);
  if (k < b.claimed) {
    SharedSlot& s = b.slots[k];
    if (s.line != line || std::strcmp(s.name, name) != 0 || s.bytes != bytes) {
      fault(std::string("__shared__ declaration #") + std::to_string(k) + " of this thread is '" + name + "' (" +
            file + ":" + std::to_string(line) + ") but another thread's is '" + s.name + "' (" + s.file + ":" +
            std::to_string(s.line) + ")");
    }
    return s.data;
  }
  if (k >= b.slots.size()) b.slots.resize(k + 1);
  SharedSlot& s = b.slots[k];
  if (s.raw == nullptr || s.bytes != bytes) alloc_slot(s, bytes);
  s.name = name;
  s.file = file;
  s.line = line;
  poison_slot(s);
  b.claimed = k + 1;
  size_t total = 0;
  for (size_t i = 0; i < b.claimed; ++i) total += b.slots[i].bytes;
  if (total > kStaticSharedLimit) {
    fault("static __shared__ memory of the kernel reaches " + std::to_string(total) + " bytes with '" + name +
          "' (" + file + ":" + std::to_string(line) + "); sm_90 allows 48 KB (more only as dynamic shared memory)");
  }
  return s.data;
}

template <typename A, size_t Align = 16>
A& shared_array(const char* name, const char* file, int line) {
  static_assert(std::is_trivially_copyable_v<std::remove_all_extents_t<A>>, "__shared__ arrays hold plain data");
  static_assert(Align <= 64, "__shared__ alignment above 64 bytes is not emulated");
  return *static_cast<A*>(shared_storage(sizeof(A), name, file, line));
}

// `extern __shared__ T name[];`: the launch's dynamic shared memory.
template <typename T>
T* dynamic_shared(const char* /*name*/, const char* /*file*/, int /*line*/) {
  return reinterpret_cast<T*>(this_block().dynamic.data);
}

// ---- barriers and warp collectives -------------------------------------------------------------------------

inline void barrier(const Location& loc) {
  Thread& t = this_thread();
  t.state = State::at_barrier;
  t.at = loc;
  t.what = "__syncthreads";
  yield_fiber(t);
}

using Combine = void (*)(Thread* lanes, uint32_t mask, Payload* out);

// A warp collective of the running lane: contributes `in`, returns its result once every lane of `mask` has
// arrived at the same collective with the same mask (the last one runs `combine` for all).
inline const Payload& collective(uint32_t mask, const char* what, const Payload& in, Combine combine,
                                 const Location& loc) {
  Thread& t = this_thread();
  Block& b = *t.block;
  Warp& w = b.warps[t.warp];
  const uint32_t bit = 1u << t.lane;
  if (!(mask & bit)) fault(std::string(what) + " at " + where(loc) + ": mask " + hex(mask) +
                           " does not name the calling lane " + std::to_string(t.lane));
  if (mask & ~w.present) {
    fault(std::string(what) + " at " + where(loc) + ": mask " + hex(mask) + " names lanes " +
          lanes_str(mask & ~w.present) + " that do not exist (blockDim " + std::to_string(b.num_threads) + ")");
  }
  if (mask & w.exited) {
    fault(std::string(what) + " at " + where(loc) + ": mask " + hex(mask) + " names lanes " +
          lanes_str(mask & w.exited) + " that have exited");
  }
  t.in = in;
  t.mask = mask;
  t.what = what;
  t.at = loc;
  w.waiting |= bit;
  Thread* lanes = &b.threads[static_cast<size_t>(t.warp) * 32];
  if ((w.waiting & mask) == mask) {
    for (int j = 0; j < 32; ++j) {
      if (!((mask >> j) & 1u)) continue;
      const Thread& o = lanes[j];
      if (o.mask != mask || std::strcmp(o.what, what) != 0 || o.at.line() != loc.line()) {
        fault(std::string(what) + " at " + where(loc) + " (mask " + hex(mask) + ") meets lane " +
              std::to_string(j) + " at " + o.what + " at " + where(o.at) + " (mask " + hex(o.mask) +
              "): the lanes of a warp collective must execute the same one with the same mask");
      }
    }
    combine(lanes, mask, w.out);
    w.waiting &= ~mask;
    for (int j = 0; j < 32; ++j) {
      if (((mask >> j) & 1u) && j != t.lane) {
        lanes[j].state = State::ready;
        b.cursor = std::min(b.cursor, static_cast<size_t>(b.position[static_cast<size_t>(lanes[j].linear)]));
      }
    }
    return w.out[t.lane];
  }
  t.state = State::at_collective;
  yield_fiber(t);
  return w.out[t.lane];
}

// ---- cp.async -------------------------------------------------------------------------------------------------

inline void perform(const AsyncCopy& c) {
  if (c.src_bytes) std::memcpy(c.dst, c.src, c.src_bytes);
  if (c.src_bytes < c.bytes) std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, c.bytes - c.src_bytes);
}

inline void finish_copies(Thread& t) {
  for (auto& g : t.copy_groups) {
    for (const AsyncCopy& c : g) perform(c);
  }
  for (const AsyncCopy& c : t.open_copies) perform(c);
  t.copy_groups.clear();
  t.open_copies.clear();
}

inline void finish_thread(Thread& t) {
  Block& b = *t.block;
  finish_copies(t);
  Warp& w = b.warps[t.warp];
  const uint32_t bit = 1u << t.lane;
  w.exited |= bit;
  t.state = State::exited;
  --b.live;
  Thread* lanes = &b.threads[static_cast<size_t>(t.warp) * 32];
  for (int j = 0; j < 32; ++j) {
    if (((w.waiting >> j) & 1u) && (lanes[j].mask & bit)) {
      fault("exits while lane " + std::to_string(j) + " waits for it at " + lanes[j].what + " at " +
            where(lanes[j].at) + " (mask " + hex(lanes[j].mask) + ")");
    }
  }
}

// ---- the scheduler ----------------------------------------------------------------------------------------------

inline uint64_t next_random(uint64_t& s) {  // splitmix64
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

inline void order_indices(std::vector<int>& order, int n, Order how, uint64_t& rng) {
  order.resize(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) order[static_cast<size_t>(i)] = how == Order::reverse ? n - 1 - i : i;
  if (how == Order::random) {
    for (int i = n - 1; i > 0; --i) std::swap(order[static_cast<size_t>(i)], order[next_random(rng) % (i + 1)]);
  }
}

// No thread is ready and some are live: release a barrier every live thread waits at, or report the deadlock.
inline void resolve(Block& b) {
  for (Thread& t : b.threads) {
    if (t.state != State::at_collective) continue;
    const Warp& w = b.warps[t.warp];
    const uint32_t missing = t.mask & ~w.waiting;
    std::string who;
    for (int j = 0; j < 32; ++j) {
      if (!((missing >> j) & 1u)) continue;
      const Thread& o = b.threads[static_cast<size_t>(t.warp) * 32 + j];
      who += "; lane " + std::to_string(j) + (o.state == State::exited ? std::string(" has exited")
                                                                      : std::string(" is at ") + o.what + " at " +
                                                                            where(o.at));
    }
    throw Fault(block_str(b) + " " + thread_str(t) + ": " + t.what + " at " + where(t.at) + " (mask " +
                hex(t.mask) + ") never completes" + who);
  }
  const Thread* first = nullptr;
  for (const Thread& t : b.threads) {
    if (t.state != State::at_barrier) continue;
    if (first == nullptr) {
      first = &t;
    } else if (t.at.line() != first->at.line() || std::strcmp(t.at.file_name(), first->at.file_name()) != 0) {
      throw Fault(block_str(b) + ": divergent __syncthreads: " + thread_str(*first) + " waits at " +
                  where(first->at) + ", " + thread_str(t) + " at " + where(t.at) +
                  " (every live thread of a block must reach the same barrier)");
    }
  }
  for (Thread& t : b.threads) {
    if (t.state == State::at_barrier) {
      t.state = State::ready;
    }
  }
  b.cursor = 0;
}

inline void order_threads(Block& b, Order how) {
  const int n = b.num_threads;
  order_indices(b.order, n, how, b.rng);
  b.position.resize(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) b.position[static_cast<size_t>(b.order[static_cast<size_t>(i)])] = i;
  b.cursor = 0;
}

inline void check_guards(const Block& b) {
  const auto check = [&](const SharedSlot& s, const std::string& name) {
    if (s.data == nullptr) return;
    const long at = damaged_guard(s);
    if (at != 0) {
      throw Fault(block_str(b) + ": out-of-bounds write to " + name + ": byte " + std::to_string(at) +
                  " of an array of " + std::to_string(s.bytes) + " bytes was written");
    }
  };
  for (size_t i = 0; i < b.claimed; ++i) {
    const SharedSlot& s = b.slots[i];
    check(s, std::string("__shared__ ") + s.name + " (" + s.file + ":" + std::to_string(s.line) + ")");
  }
  check(b.dynamic, "the dynamic shared memory");
}

inline void run_block(Block& b) {
  const int n = b.num_threads;
  b.threads.resize(static_cast<size_t>(n));
  b.warps.assign(static_cast<size_t>((n + 31) / 32), Warp{});
  for (int i = 0; i < n; ++i) {
    Thread& t = b.threads[static_cast<size_t>(i)];
    t.block = &b;
    t.linear = i;
    t.lane = i % 32;
    t.warp = i / 32;
    t.thread_idx = {static_cast<unsigned>(i) % b.block_dim.x, static_cast<unsigned>(i) / b.block_dim.x % b.block_dim.y,
                    static_cast<unsigned>(i) / (b.block_dim.x * b.block_dim.y)};
    t.state = State::ready;
    t.mask = 0;
    t.what = "";
    t.shared_decls = 0;
    t.copy_groups.clear();
    t.open_copies.clear();
    b.warps[static_cast<size_t>(t.warp)].present |= 1u << t.lane;
    start_fiber(t);
  }
  b.live = n;
  b.claimed = 0;
  b.fault.clear();
  if (b.dynamic.data != nullptr) poison_slot(b.dynamic);
  const Order how = schedule().order;
  order_threads(b, how);
  while (b.live > 0) {
    while (b.cursor < b.order.size() && b.threads[static_cast<size_t>(b.order[b.cursor])].state != State::ready) {
      ++b.cursor;
    }
    if (b.cursor == b.order.size()) {  // nobody ready: a barrier to release, or a deadlock
      resolve(b);
      if (how == Order::random) order_threads(b, how);
      continue;
    }
    resume(b, b.threads[static_cast<size_t>(b.order[b.cursor])]);
    if (!b.fault.empty()) throw Fault(b.fault);
  }
  check_guards(b);
}

// Runs body(ctx) as every thread of every block of the grid.
inline void run_grid(dim3 grid, dim3 block, size_t dynamic_bytes, void (*body)(void*), void* ctx) {
  if (g_block != nullptr) throw Fault("phi_fast sim: kernel launches from device code are not emulated");
  Block b;
  b.block_dim = block;
  b.grid_dim = grid;
  b.num_threads = static_cast<int>(block.x * block.y * block.z);
  b.body = body;
  b.body_ctx = ctx;
  b.rng = schedule().seed * 0x9E3779B97F4A7C15ull + 1;
  if (dynamic_bytes > 0) alloc_slot(b.dynamic, dynamic_bytes);
  const int64_t num_blocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  std::vector<int> order;
  order_indices(order, static_cast<int>(num_blocks), schedule().order, b.rng);
  bool ok = false;
  struct Cleanup {  // runs on success and on a fault
    Block& b;
    bool& ok;
    ~Cleanup() {
      g_block = nullptr;
      g_thread = nullptr;
      for (Thread& t : b.threads) {
        if (t.stack == nullptr) continue;
        if (ok) {
          stack_pool().push_back(t.stack);
        } else {
          drop_stack(t.stack);
        }
      }
    }
  } cleanup{b, ok};
  g_block = &b;
  for (int i : order) {
    const auto u = static_cast<unsigned>(i);
    b.block_idx = {u % grid.x, u / grid.x % grid.y, u / (grid.x * grid.y)};
    run_block(b);
  }
  ok = true;
}

// ---- launch -----------------------------------------------------------------------------------------------------

// Dynamic shared memory limits set by cudaFuncSetAttribute, per kernel.
inline std::vector<std::pair<const void*, size_t>>& max_dynamic_shared() {
  static std::vector<std::pair<const void*, size_t>> limits;
  return limits;
}

inline size_t dynamic_shared_limit(const void* kernel) {
  for (const auto& [k, bytes] : max_dynamic_shared()) {
    if (k == kernel) return bytes;
  }
  return kDynamicSharedDefault;
}

// sm_90's launch limits; a violation sets the runtime's last error (as a real <<<>>> launch does) and returns false.
inline bool launch_ok(const void* kernel, dim3 grid, dim3 block, size_t dynamic_bytes) {
  const uint64_t threads = static_cast<uint64_t>(block.x) * block.y * block.z;
  const bool config_ok = threads >= 1 && threads <= kMaxThreadsPerBlock && block.x <= 1024 && block.y <= 1024 &&
                         block.z <= 64 && grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 0x7FFFFFFFu &&
                         grid.y <= 65535 && grid.z <= 65535;
  if (!config_ok) {
    last_error() = 9;  // cudaErrorInvalidConfiguration
    return false;
  }
  if (dynamic_bytes > dynamic_shared_limit(kernel)) {
    last_error() = 1;  // cudaErrorInvalidValue
    return false;
  }
  return true;
}

template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t dynamic_bytes, Args&&... args) {
  if (!launch_ok(reinterpret_cast<const void*>(kernel), grid, block, dynamic_bytes)) return;
  std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  struct Call {
    void (*kernel)(Params...);
    std::tuple<std::decay_t<Params>...>* params;
  } call{kernel, &params};
  run_grid(grid, block, dynamic_bytes, [](void* c) {
    auto* call = static_cast<Call*>(c);
    std::apply(call->kernel, *call->params);  // each thread gets its own copies of the parameters
  }, &call);
}

}  // namespace phi_fast::sim
