// Row-bitmask form of an ROI (grids with W <= 64): one uint64 per row, bit x = column x.
// The fused plan only needs to know whether d^2 <= hard_sqdist, not d^2 itself, so instead of the
// exact EDT it dilates the boundary by the integer disk of radius^2 hard_sqdist: a few word
// operations per row (3 rows x 3 shifts for the default hard_sqdist = 2). Same sets as the EDT by
// construction: d^2(i) <= h  <=>  some boundary pixel b has (dy)^2 + (dx)^2 <= h.
#pragma once

#include "device_math.h"

namespace contrastmask {

constexpr int kMaxRowBitsWidth = 64;

CM_HD uint64_t row_full(int W) { return W >= 64 ? ~0ULL : ((1ULL << W) - 1ULL); }

// Boundary bits of row y (SPEC step 2): pixels with a 4-neighbour of the other value, in the grid.
CM_HD uint64_t boundary_row(const uint64_t* mask_rows, int H, int W, int y) {
  const uint64_t m = mask_rows[y];
  const uint64_t full = row_full(W);
  const uint64_t right_differs = (m ^ (m >> 1)) & (full >> 1);  // bit x: column x differs from x + 1
  uint64_t b = right_differs | (right_differs << 1);
  if (y > 0) b |= m ^ mask_rows[y - 1];
  if (y + 1 < H) b |= m ^ mask_rows[y + 1];
  return b & full;
}

// Largest r with r * r <= v (v >= 0), exact for the small values used here.
CM_HD int64_t isqrt(int64_t v) {
  int64_t r = static_cast<int64_t>(sqrt(static_cast<double>(v)));
  while (r * r > v) --r;
  while ((r + 1) * (r + 1) <= v) ++r;
  return r;
}

// Pixels within horizontal distance r of a set bit of `bits` (r >= 0).
CM_HD uint64_t dilate_row(uint64_t bits, int64_t r, uint64_t full) {
  if (bits == 0) return 0;
  if (r >= 63) return full;
  uint64_t out = bits;
  for (int j = 1; j <= r; ++j) out |= (bits << j) | (bits >> j);
  return out & full;
}

// Hard-band bits of row y: pixels with squared distance <= h to some boundary pixel, where
// radius[d] = isqrt(h - d * d) for d = 0..reach and reach = isqrt(h) (h >= 0, computed once per call).
// `boundary_rows` holds boundary_row() of every row; the caller handles "no boundary at all".
CM_HD uint64_t hard_band_row(const uint64_t* boundary_rows, int H, int W, int y, const int* radius, int reach) {
  const uint64_t full = row_full(W);
  const int lo = reach >= y ? 0 : y - reach;
  const int hi = reach >= H - 1 - y ? H - 1 : y + reach;
  uint64_t band = 0;
  for (int yy = lo; yy <= hi && band != full; ++yy)
    band |= dilate_row(boundary_rows[yy], radius[yy > y ? yy - y : y - yy], full);
  return band;
}

}  // namespace contrastmask
