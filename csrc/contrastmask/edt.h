// Exact squared Euclidean distance to a mask's boundary (SPEC step 2), in integers, with
// Meijster, Roerdink & Hesselink's separable algorithm (2000): a column pass, then a row pass
// taking the lower envelope of parabolas. O(H*W) per ROI; identical results on every device.
#pragma once

#include "device_math.h"
#include "sampling.h"

namespace contrastmask {

// Pixel i is on the boundary iff some in-grid 4-neighbour has a different mask value.
CM_HD bool is_boundary(const uint8_t* mask, int H, int W, int y, int x) {
  const uint8_t v = mask[y * W + x];
  return (y > 0 && mask[(y - 1) * W + x] != v) || (y + 1 < H && mask[(y + 1) * W + x] != v) ||
         (x > 0 && mask[y * W + x - 1] != v) || (x + 1 < W && mask[y * W + x + 1] != v);
}

// Column pass for column x: g[y*W + x] = vertical distance to the nearest boundary pixel of the
// column, or `inf` (= H + W, larger than any in-grid distance) when the column has none.
CM_HD void edt_column_pass(const uint8_t* boundary, int16_t* g, int H, int W, int x) {
  const int inf = H + W;
  int d = inf;
  for (int y = 0; y < H; ++y) {
    d = boundary[y * W + x] ? 0 : (d >= inf ? inf : d + 1);
    g[y * W + x] = static_cast<int16_t>(d);
  }
  for (int y = H - 2; y >= 0; --y) {
    const int below = g[(y + 1) * W + x];
    if (below + 1 < g[y * W + x]) g[y * W + x] = static_cast<int16_t>(below + 1);
  }
}

// Row pass for row y: sqdist[y*W + u] = min_i (u - i)^2 + g(i)^2. `s` and `t` are scratch of W
// entries (the envelope's parabola apexes and the columns where each one starts to win).
CM_HD void edt_row_pass(const int16_t* g, int32_t* sqdist, int W, int y, int16_t* s, int16_t* t) {
  const int16_t* gy = g + y * W;
  int q = 0;
  s[0] = 0;
  t[0] = 0;
  for (int u = 1; u < W; ++u) {
    const int gu2 = gy[u] * gy[u];
    // f(x, i) = (x - i)^2 + g(i)^2; pop apexes that u beats at the start of their interval.
    while (q >= 0) {
      const int sq = s[q], tq = t[q];
      if ((tq - sq) * (tq - sq) + gy[sq] * gy[sq] <= (tq - u) * (tq - u) + gu2) break;
      --q;
    }
    if (q < 0) {
      q = 0;
      s[0] = static_cast<int16_t>(u);
    } else {
      const int sq = s[q];
      // First column where u beats s[q] (Meijster's Sep, numerator >= 0 here).
      const int w = 1 + (u * u - sq * sq + gu2 - gy[sq] * gy[sq]) / (2 * (u - sq));
      if (w < W) {
        ++q;
        s[q] = static_cast<int16_t>(u);
        t[q] = static_cast<int16_t>(w);
      }
    }
  }
  for (int u = W - 1; u >= 0; --u) {
    const int sq = s[q];
    sqdist[y * W + u] = (u - sq) * (u - sq) + gy[sq] * gy[sq];
    if (u == t[q]) --q;
  }
}

}  // namespace contrastmask
