/* The C core on its own: statistics and the training forward pass of a (N, D) batch.
 * Compiled and run by tests/test_guide.py; see docs/c_cython.rst. */
#include <stdio.h>

#include "bn/bn.h"

int main(void) {
    /* the mini-batch (4,5,2,1), (3,4,6,0), (1,4,7,9): N = 3 rows, D = 4 features */
    const double x[3][4] = {{4, 5, 2, 1}, {3, 4, 6, 0}, {1, 4, 7, 9}};
    double y[3][4], mean[4], var[4];
    /* (N, D) as (outer, channels, inner) = (N, D, 1); strides in elements */
    bn_shape s = {3, 4, 1};
    bn_strides st = {4, 1, 1};
    int rc = bn_forward_train_f64(s, &x[0][0], st, &y[0][0], st, NULL, NULL, 0.0, mean, var, NULL);
    if (rc != BN_OK) {
        fprintf(stderr, "bn_forward_train_f64 failed: %d\n", rc);
        return 1;
    }
    printf("isa %s\n", bn_active_isa());
    printf("mean %.4f %.4f %.4f %.4f\n", mean[0], mean[1], mean[2], mean[3]);
    printf("var  %.4f %.4f %.4f %.4f\n", var[0], var[1], var[2], var[3]);
    printf("y[0] %.4f %.4f %.4f %.4f\n", y[0][0], y[0][1], y[0][2], y[0][3]);
    return 0;
}
