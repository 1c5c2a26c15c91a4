/* The 256-bit float32 vocabulary (8 lanes) for float32, float16 and bfloat16 storage: every
 * element type of the avx2 set but float64, and float16/bfloat16 in the avx512 set. Included
 * per element type (BN_KIND) by avx2.h and avx512.h; no include guard. */
#define BN_V __m256
#define BN_W 8
#define BN_VLDC _mm256_loadu_ps
#define BN_VSET1 _mm256_set1_ps
#define BN_VSUB _mm256_sub_ps
#define BN_VMUL _mm256_mul_ps
#define BN_VFMA _mm256_fmadd_ps
#define BN_VADD _mm256_add_ps
#define BN_VMAX _mm256_max_ps
#if BN_KIND == BN_KIND_F32
#define BN_VLD _mm256_loadu_ps
#define BN_VST _mm256_storeu_ps
#define BN_LOAD4D(p) _mm256_cvtps_pd(_mm_loadu_ps(p))
#define BN_VSTNT _mm256_stream_ps
#define BN_CAN_STREAM 1
#elif BN_KIND == BN_KIND_F16
#define BN_VLD bn_load8_f16
#define BN_VST bn_store8_f16
#define BN_LOAD4D(p) _mm256_cvtps_pd(bn_load4_f16(p))
#else
#define BN_VLD bn_load8_bf16
#define BN_VST bn_store8_bf16
#define BN_LOAD4D(p) _mm256_cvtps_pd(bn_load4_bf16(p))
#endif
