/* The baseline kernel set: no vectors (BN_SIMD 0); the loops' scalar paths run, compiled
 * without auto-vectorisation so that this really is the portable path. Chosen by eltype.h
 * when the compiler targets neither x86 set; read once per element type. */
#define BN_SIMD 0
#define BN_AVX512 0
#define BN_CAN_STREAM 0
