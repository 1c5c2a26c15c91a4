/* Gradients of batch normalization, training and frozen statistics
 * (compiled once per ISA). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "unit.h"

#define BN_TEMPLATE "backward_impl.h"
#include "instantiate.h"
