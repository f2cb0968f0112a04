// The kernels compiled for the scalar level (flags in CMakeLists.txt); see kernels_impl.h.
#define MAGICPIG_ISA_NS mp_scalar
#define MAGICPIG_ISA_NAME "scalar"
#include "kernels_impl.h"
