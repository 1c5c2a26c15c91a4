/* Gradients of batch normalization, training and frozen statistics
 * (compiled once per ISA). */
#include <math.h>
#include <stdlib.h>

#include "unit.h"

#define BN_T float
#define BN_TN f32
#define BN_IS_F32 1
#include "backward_impl.h"
#undef BN_T
#undef BN_TN
#undef BN_IS_F32

#define BN_T double
#define BN_TN f64
#define BN_IS_F32 0
#include "backward_impl.h"
#undef BN_T
#undef BN_TN
#undef BN_IS_F32
