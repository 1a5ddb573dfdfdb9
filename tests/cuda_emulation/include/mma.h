// Stands in for the toolkit's header of the same name (tests/cuda_emulation/emu.h).
#pragma once
#include "../emu_wmma.h"
