// Argument conversions shared by the pybind11 entry points (bindings.cpp, cuda/*_bind.cpp).
#pragma once

#include <array>
#include <cstdint>

#include "common/philox.hpp"

namespace dpfc {

// The Philox key and counter words of a noise call, as passed from Python (four uint32).
inline NoiseKey key_from_words(const std::array<uint32_t, 4>& w) {
  return {w[0], w[1], w[2], w[3]};
}

}  // namespace dpfc
