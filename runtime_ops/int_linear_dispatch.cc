// Which baseq.IntLinear kernel runs: the instruction sets this build has kernels for, which of
// them this CPU (and OS) supports, asked at run time, never assumed from the build machine.
#include <cstring>
#include <initializer_list>

#include "int_linear.h"

#if defined(__aarch64__)
#include <sys/auxv.h>
#ifndef HWCAP_ASIMDDP
#define HWCAP_ASIMDDP (1 << 20)  // the dot-product extension, as in the kernel's asm/hwcap.h
#endif
#endif

namespace baseq {
namespace intlin {

const char* IsaName(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return "scalar";
    case Isa::kAvx2: return "avx2";
    case Isa::kAvxVnni: return "avxvnni";
    case Isa::kAvx512Vnni: return "avx512vnni";
    case Isa::kNeon: return "neon";
    case Isa::kNeonDot: return "neondot";
  }
  return "?";
}

bool IsaFromName(const char* name, Isa* isa) {
  for (Isa i : kAllIsas) {
    if (std::strcmp(name, IsaName(i)) == 0) {
      *isa = i;
      return true;
    }
  }
  return false;
}

bool IsaCompiled(Isa isa) {
  switch (isa) {
    case Isa::kScalar: return true;
#if defined(__x86_64__)
    case Isa::kAvx2:
    case Isa::kAvxVnni:
    case Isa::kAvx512Vnni: return true;
#endif
#if defined(__aarch64__)
    case Isa::kNeon:
    case Isa::kNeonDot: return true;
#endif
    default: return false;
  }
}

bool IsaAvailable(Isa isa) {
  if (!IsaCompiled(isa)) return false;
#if defined(__x86_64__)
  // __builtin_cpu_supports reads CPUID and, for AVX/AVX-512, whether the OS saves those registers.
  __builtin_cpu_init();
  switch (isa) {
    case Isa::kAvx2: return __builtin_cpu_supports("avx2");
    case Isa::kAvxVnni: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avxvnni");
    case Isa::kAvx512Vnni:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vnni");
    default: break;
  }
#endif
#if defined(__aarch64__)
  if (isa == Isa::kNeonDot) return (getauxval(AT_HWCAP) & HWCAP_ASIMDDP) != 0;
#endif
  return true;  // scalar, and NEON (mandatory on aarch64)
}

TileFn TileKernel(Isa isa) {
  if (!IsaAvailable(isa)) return nullptr;
  switch (isa) {
    case Isa::kScalar: return TilesScalar;
#if defined(__x86_64__)
    case Isa::kAvx2: return TilesAvx2;
    case Isa::kAvxVnni: return TilesAvxVnni;
    case Isa::kAvx512Vnni: return TilesAvx512Vnni;
#endif
#if defined(__aarch64__)
    case Isa::kNeon: return TilesNeon;
    case Isa::kNeonDot: return TilesNeonDot;
#endif
    default: return nullptr;
  }
}

CodesFn CodesKernel(Isa isa) {
  if (!IsaAvailable(isa)) return nullptr;
  switch (isa) {
    case Isa::kScalar: return CodesScalar;
#if defined(__x86_64__)
    case Isa::kAvx2: return CodesAvx2;
    case Isa::kAvxVnni: return CodesAvxVnni;
    case Isa::kAvx512Vnni: return CodesAvx512Vnni;
#endif
#if defined(__aarch64__)
    case Isa::kNeon: return CodesNeon;
    case Isa::kNeonDot: return CodesNeonDot;
#endif
    default: return nullptr;
  }
}

Isa BestIsa() {
  for (Isa isa : {Isa::kAvx512Vnni, Isa::kAvxVnni, Isa::kAvx2, Isa::kNeonDot, Isa::kNeon})
    if (IsaAvailable(isa)) return isa;
  return Isa::kScalar;
}

}  // namespace intlin
}  // namespace baseq
