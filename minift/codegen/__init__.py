"""Code generation shared by the backends that render kernels to source (cstyle.py); each
backend's dialect and loop structure live in its own package."""
