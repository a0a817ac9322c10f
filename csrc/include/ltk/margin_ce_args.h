// The one declaration of ltkernels::margin_ce's arguments, in schema order. Everything that lists them
// is generated from here: the schema (csrc/ops.cpp), the C++ signatures and MarginCeInputs
// (csrc/margin_ce_op.h), the per-vector checks and MarginCePrepared (csrc/margin_ce_common.*), the raw
// pointers of MarginCeArgs (ltk/margin_ce.h), the autograd function's argument indices, the emulator's
// flat struct (python_tests/emu/margin_ce.cpp); Python reads the schema and ltkernels._C.margin_ce_vectors.
//
// LTK_MARGIN_CE_ARGS(X, SEP) expands X(KIND, name, extra) for every argument, SEP() between two:
//   TENSOR  a required tensor (input, target)
//   VEC     an optional vector of length `extra` (C: one value per class, N: one per row), checked and
//           converted to the accumulation dtype by prepare_margin_ce, read by the kernels as a const acc_t*
//           in MarginCeArgs (null: absent). A new per-class vector is one line here, plus its use in the
//           row math (ltk/transform.h) and a keyword of ltkernels.functional.margin_cross_entropy.
//   OPT     an optional tensor with checks of its own (noise, seed)
//   FLOAT, INT, BOOL  scalars; `extra` is the schema's default (a literal: it is also stringised)
//   GEN     an optional torch.Generator (None: the device's default generator)
// The vectors are listed on their own (LTK_MARGIN_CE_VECTOR_ARGS) for the code that only handles them.
#pragma once

// clang-format off
#define LTK_MARGIN_CE_VECTOR_ARGS(X, SEP)                                                             \
  X(VEC, col_scale, C)     /* r_j: multiplies the logit */                                            \
  SEP() X(VEC, col_bias, C)      /* b_j: added to the logit */                                        \
  SEP() X(VEC, margin, C)        /* m_y: subtracted from the target logit */                          \
  SEP() X(VEC, target_scale, C)  /* S_i = target_scale[y_i] instead of scale */                       \
  SEP() X(VEC, weight, C)        /* w_j: class weight */                                              \
  SEP() X(VEC, row_shift, N)     /* t_i, differentiable */                                            \
  SEP() X(VEC, shift_coef, C)    /* beta_j: row i gets t_i beta_j */                                  \
  SEP() X(VEC, cloud, C)         /* delta_j: Gaussian cloud active when given */

#define LTK_MARGIN_CE_ARGS(X, SEP)                                                                    \
  X(TENSOR, input, )                                                                                  \
  SEP() X(TENSOR, target, )                                                                           \
  SEP() LTK_MARGIN_CE_VECTOR_ARGS(X, SEP)                                                             \
  SEP() X(OPT, noise, )          /* injected raw N(0, 1/3) draw (N, C) */                             \
  SEP() X(OPT, seed, )           /* one-element int64 CPU tensor keying the Philox noise */           \
  SEP() X(FLOAT, scale, 1.0)                                                                          \
  SEP() X(FLOAT, noise_mul, 1.0)                                                                      \
  SEP() X(FLOAT, angular_eps, 0.0)                                                                    \
  SEP() X(INT, offset, 0)                                                                             \
  SEP() X(INT, angular, 0)       /* Angular code, 0 = kLinear */                                      \
  SEP() X(INT, reduction, 2)     /* Reduction code, 2 = kReduceMean */                                \
  SEP() X(INT, focal, 0)         /* Focal code, 0 = kFocalOff */                                      \
  SEP() X(FLOAT, gamma, 0.0)                                                                          \
  SEP() X(INT, ignore_index, -100)                                                                    \
  SEP() X(FLOAT, label_smoothing, 0.0)                                                                \
  SEP() X(BOOL, compute_grad, false)                                                                  \
  SEP() X(GEN, generator, )      /* CUDA: the Philox state of a cloud without seed/noise */
// clang-format on

// Separators for SEP.
#define LTK_MCE_COMMA() ,
#define LTK_MCE_NOSEP()

// The argument names as a comma-separated list, with a prefix (`in.` for the fields of a MarginCeInputs).
#define LTK_MCE_NAME(kind, name, extra) name
#define LTK_MARGIN_CE_NAMES LTK_MARGIN_CE_ARGS(LTK_MCE_NAME, LTK_MCE_COMMA)

// Index of each argument in the schema: kMarginCeArg_input, ..., and kMarginCeNumArgs.
#define LTK_MCE_INDEX(kind, name, extra) kMarginCeArg_##name,
#define LTK_MARGIN_CE_ARG_INDEX_ENUM \
  enum MarginCeArgIndex : int { LTK_MARGIN_CE_ARGS(LTK_MCE_INDEX, LTK_MCE_NOSEP) kMarginCeNumArgs };
