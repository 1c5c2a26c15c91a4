/* Training and inference forward: y = gamma * (x - mean) / sqrt(var + eps) + beta
 * (compiled once per ISA). */
#include <math.h>
#include <stdlib.h>

#include "unit.h"

#define BN_KIND BN_KIND_F32
#include "normalize_impl.h"
#undef BN_KIND

#define BN_KIND BN_KIND_F64
#include "normalize_impl.h"
#undef BN_KIND

#define BN_KIND BN_KIND_F16
#include "normalize_impl.h"
#undef BN_KIND

#define BN_KIND BN_KIND_BF16
#include "normalize_impl.h"
#undef BN_KIND
