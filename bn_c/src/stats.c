/* Per-channel batch mean and biased variance (compiled once per ISA). */
#include <math.h>
#include <stdlib.h>

#include "unit.h"

#define BN_KIND BN_KIND_F32
#include "stats_impl.h"
#undef BN_KIND

#define BN_KIND BN_KIND_F64
#include "stats_impl.h"
#undef BN_KIND

#define BN_KIND BN_KIND_F16
#include "stats_impl.h"
#undef BN_KIND

#define BN_KIND BN_KIND_BF16
#include "stats_impl.h"
#undef BN_KIND
