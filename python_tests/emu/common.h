// Glue shared by the translation units of the emulation test library (python_tests/emu/*.cpp): C entry
// points that Python calls through ctypes. Every entry point returns 0 on success and 1 on failure; the
// message of the failure is in ltk_emu_last_error().
#pragma once

#include <exception>
#include <string>

#include "../../csrc/emu/simt.h"

namespace ltk_emu_test {
// Not thread_local: thread-local storage in this library is reserved for static __shared__ variables.
inline std::string& last_error() {
  static std::string e;
  return e;
}
}  // namespace ltk_emu_test

#define LTK_EMU_EXPORT extern "C" __attribute__((visibility("default")))

// Runs the statement(s); an exception becomes return code 1 and the stored message.
#define LTK_EMU_TRY(...)                                   \
  try {                                                    \
    __VA_ARGS__;                                           \
    return 0;                                              \
  } catch (const std::exception& e) {                      \
    ::ltk_emu_test::last_error() = e.what();               \
    return 1;                                              \
  } catch (...) {                                          \
    ::ltk_emu_test::last_error() = "unknown C++ exception"; \
    return 1;                                              \
  }
