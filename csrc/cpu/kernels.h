// Settings of the CPU kernels (csrc/cpu/kernels.cpp) that the Python module exposes.
#pragma once

#include <cstdint>

namespace mmkernels::cpu {

// Tile edges of S: rows of A by rows of B.
struct TileShape {
  int64_t rows;
  int64_t cols;
};

TileShape tile_shape();
// Sets the tile edges (tests use small ones); returns the previous ones.
TileShape set_tile_shape(TileShape shape);

}  // namespace mmkernels::cpu
