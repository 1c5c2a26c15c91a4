/* Instantiates the kernel template named by BN_TEMPLATE once per element type (see
 * eltype.h). No include guard: each kernel family includes it once. */
#define BN_KIND BN_KIND_F32
#include BN_TEMPLATE
#undef BN_KIND

#define BN_KIND BN_KIND_F64
#include BN_TEMPLATE
#undef BN_KIND

#define BN_KIND BN_KIND_F16
#include BN_TEMPLATE
#undef BN_KIND

#define BN_KIND BN_KIND_BF16
#include BN_TEMPLATE
#undef BN_KIND
