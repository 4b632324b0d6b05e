"""Backends: reference (PyTorch), triton (CUDA kernels), mate (Moore Threads). See dispatch.py."""
