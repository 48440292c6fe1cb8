// baseq.Attention's inner loops built with -mavx2 (run only where the CPU has AVX2).
#include "attention_rows.h"

BASEQ_ATTENTION_KERNELS(Avx2)
