// The forward kernels and launchers, compiled by the host compiler for the emulated
// GPU: the very source nvcc builds for a real one.
#include "../forward.cu"
