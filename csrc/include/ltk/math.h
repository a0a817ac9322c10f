// Precision-matched libm calls for the shared math (float -> expf, double -> exp, ...), usable on the
// host, on the device and in the SIMT emulator.
#pragma once

#include <cmath>

#include "ltk/hd.h"

namespace ltk {

template <typename T>
LTK_HD T ltk_exp(T x) {
  return ::exp(x);
}
template <>
LTK_HD float ltk_exp<float>(float x) {
  return ::expf(x);
}
template <typename T>
LTK_HD T ltk_log(T x) {
  return ::log(x);
}
template <>
LTK_HD float ltk_log<float>(float x) {
  return ::logf(x);
}
template <typename T>
LTK_HD T ltk_sqrt(T x) {
  return ::sqrt(x);
}
template <>
LTK_HD float ltk_sqrt<float>(float x) {
  return ::sqrtf(x);
}
template <typename T>
LTK_HD T ltk_pow(T x, T y) {
  return ::pow(x, y);
}
template <>
LTK_HD float ltk_pow<float>(float x, float y) {
  return ::powf(x, y);
}

}  // namespace ltk
