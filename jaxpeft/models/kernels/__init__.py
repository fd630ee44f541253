"""The kernels behind the fast compute path (Pallas on NVIDIA GPUs) and the lean ops they build on."""
