// The kernels compiled for the avx512 level (flags in CMakeLists.txt); see kernels_impl.h.
#define MAGICPIG_ISA_NS mp_avx512
#define MAGICPIG_ISA_NAME "avx512"
#include "kernels_impl.h"
