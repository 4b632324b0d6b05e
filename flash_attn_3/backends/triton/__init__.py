"""Triton backend: kernels grouped by what they compute; `routes` is the backend entry point.

The entry point lives in its own module because importing a kernel submodule (say `combine`)
binds that name on this package, which would shadow a routing function of the same name.
"""
