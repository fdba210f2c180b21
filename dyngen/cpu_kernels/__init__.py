"""C++ kernels for XLA:CPU behind the XLA FFI, built for the host on first use (docs/cpu_kernels.md).

  attention  fused softmax self-attention, forward and backward, reading q, k, v in place from the qkv
             projection's (..., T, 3, H, Dh) output.

XLA:CPU has no fused attention and Pallas does not compile for CPU; on TPU and GPU the models use Pallas and
cuDNN kernels instead, and nothing here is built or loaded.
"""
