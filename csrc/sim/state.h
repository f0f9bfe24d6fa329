// SIMT emulator (csrc/sim): the process-wide settings and the runtime's sticky error, with no CUDA names and no
// macros, so torch-including code (csrc/bindings.cpp, csrc/ops/checks.h) can include it in the sim build.
//
// Order: the order in which a block's ready threads run between two synchronization points (and in which the
// grid's blocks run). "forward" (thread 0 first), "reverse" (last thread first) or "random" (a fresh seeded
// permutation each round). A kernel that reads shared memory before the barrier that makes it valid, or that
// relies on one thread running before another, gives a different answer under another order.
// PHI_FAST_SIM_ORDER=forward|reverse|random[:seed] sets the initial order; set_order changes it at run time.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>

namespace phi_fast::sim {

enum class Order : int { forward = 0, reverse = 1, random = 2 };

struct Schedule {
  Order order = Order::forward;
  uint64_t seed = 0;
};

inline Schedule parse_order(const std::string& text) {
  const std::string name = text.substr(0, text.find(':'));
  Schedule s;
  if (name == "forward") {
    s.order = Order::forward;
  } else if (name == "reverse") {
    s.order = Order::reverse;
  } else if (name == "random") {
    s.order = Order::random;
    if (text.find(':') != std::string::npos) s.seed = std::stoull(text.substr(text.find(':') + 1));
  } else {
    throw std::invalid_argument("phi_fast sim: unknown thread order '" + text +
                                "' (supported: forward, reverse, random[:seed])");
  }
  return s;
}

inline Schedule& schedule() {
  static Schedule s = [] {
    const char* env = std::getenv("PHI_FAST_SIM_ORDER");
    return env != nullptr && *env != '\0' ? parse_order(env) : Schedule{};
  }();
  return s;
}

// Sets the thread order of later launches: "forward", "reverse" or "random" (with `seed`).
inline void set_order(const std::string& order, uint64_t seed) {
  Schedule s = parse_order(order);
  if (s.order == Order::random && order.find(':') == std::string::npos) s.seed = seed;
  schedule() = s;
}

inline std::string order_name() {
  switch (schedule().order) {
    case Order::forward: return "forward";
    case Order::reverse: return "reverse";
    case Order::random: return "random:" + std::to_string(schedule().seed);
  }
  return "?";
}

// The runtime's last error (cudaError_t values), as cudaGetLastError reports and clears it.
inline int& last_error() {
  static thread_local int error = 0;
  return error;
}

inline const char* error_string(int error) {
  switch (error) {
    case 0: return "no error";
    case 1: return "invalid argument";
    case 9: return "invalid configuration argument";
    case 98: return "invalid device function";
    case 719: return "unspecified launch failure";
    default: return "unknown error";
  }
}

// Returns and clears the last error (0 = none).
inline int take_last_error() {
  const int e = last_error();
  last_error() = 0;
  return e;
}

}  // namespace phi_fast::sim
