// The CPU emulation's stand-in for CUDA's header (kernels/emu/cuda_emu.h).
#pragma once
#include "cuda_emu.h"
