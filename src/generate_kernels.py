"""Build step (called by src/batchnorm/meson.build): expand a Tempita template of
batchnorm._kernels (`_kernels.pyx.tp`, `_kernels.pxd.tp`) over the storage kinds of the C core.

    python generate_kernels.py TEMPLATE OUTPUT
"""

import sys

from Cython.Tempita import Template

# (enum value, suffix of the C functions, C element type, Cython memoryview element type).
# float16 and bfloat16 travel as their 16-bit patterns.
KINDS = [
    (0, "f32", "float", "float"),
    (1, "f64", "double", "double"),
    (2, "f16", "uint16_t", "unsigned short"),
    (3, "bf16", "uint16_t", "unsigned short"),
]

if __name__ == "__main__":
    template, output = sys.argv[1:]
    with open(template, encoding="utf-8") as f:
        text = Template(f.read(), name=template).substitute(KINDS=KINDS)
    with open(output, "w", encoding="utf-8") as f:
        f.write(text)
