"""asv benchmark suites for batchnorm (see ../README.md)."""
