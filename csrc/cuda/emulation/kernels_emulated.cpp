// The kernel layer, compiled by the host compiler for the emulated GPU: the
// very source nvcc builds for a real one.
#include "../batch_norm_kernels.cu"
