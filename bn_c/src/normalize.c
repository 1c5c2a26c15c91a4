/* Training and inference forward: y = gamma * (x - mean) / sqrt(var + eps) + beta
 * (compiled once per ISA). */
#include <math.h>
#include <stdlib.h>

#include "unit.h"

#define BN_TEMPLATE "normalize_impl.h"
#include "instantiate.h"
