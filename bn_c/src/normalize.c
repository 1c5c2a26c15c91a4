/* Training and inference forward: y = gamma * (x - mean) / sqrt(var + eps) + beta
 * (compiled once per ISA). */
#include <math.h>
#include <stdlib.h>

#include "unit.h"

#define BN_T float
#define BN_TN f32
#define BN_IS_F32 1
#include "normalize_impl.h"
#undef BN_T
#undef BN_TN
#undef BN_IS_F32

#define BN_T double
#define BN_TN f64
#define BN_IS_F32 0
#include "normalize_impl.h"
#undef BN_T
#undef BN_TN
#undef BN_IS_F32
