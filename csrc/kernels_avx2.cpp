// The kernels compiled for the avx2 level (flags in CMakeLists.txt); see kernels_impl.h.
#define MAGICPIG_ISA_NS mp_avx2
#define MAGICPIG_ISA_NAME "avx2"
#include "kernels_impl.h"
