// baseq.Attention's inner loops built with -mavx512f (run only where the CPU has AVX-512 F).
#include "attention_rows.h"

BASEQ_ATTENTION_KERNELS(Avx512)
