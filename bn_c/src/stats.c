/* Per-channel batch mean and biased variance (compiled once per ISA). */
#include <math.h>
#include <stdlib.h>

#include "unit.h"

#define BN_TEMPLATE "stats_impl.h"
#include "instantiate.h"
