// The sanitizer's hooks and host API (csrc/emu/sanitizer_impl.h). Compiled WITHOUT the access
// instrumentation that every other translation unit of the emulation library gets (see __init__.py):
// the hooks must not call themselves.
#include "common.h"
#include "../../csrc/emu/sanitizer_impl.h"

extern "C" __attribute__((visibility("default"))) int ltk_emu_sanitizer_instrumented() {
#if defined(LTK_EMU_INSTRUMENTED)
  return 1;
#else
  return 0;
#endif
}
