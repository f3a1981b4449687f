// The deterministic key sampler of SPEC.md step 4: hash, sample sizes, candidate sets, keep rule.
#pragma once

#include "device_math.h"

namespace contrastmask {

enum Label : int8_t { kIgnored = -1, kBackground = 0, kForeground = 1 };
// Key-set ids; bit s of a key byte marks membership of set s.
enum KeySet : int { kEasyFg = 0, kHardFg = 1, kEasyBg = 2, kHardBg = 3, kNumSets = 4 };

constexpr int32_t kNoBoundary = 2147483647;  // INT32_MAX: squared distance when a mask has no boundary
constexpr int kMaxPixels = 4096;             // H * W limit (pixel index fits the hash's 20-bit field)

CM_HD uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// r(i) of SPEC step 4 = splitmix64(stream ^ i) with stream = mixed_seed ^ ((roi * 4 + set) << 20):
// the pixel index (< 2^20) lands in the stream's zero low bits, so OR and XOR agree.
// mixed_seed = splitmix64(seed), computed once per call; the stream once per (ROI, set).
CM_HD uint64_t key_stream(uint64_t mixed_seed, int64_t roi, int set) {
  return mixed_seed ^ ((static_cast<uint64_t>(roi) * 4u + static_cast<uint64_t>(set)) << 20);
}
CM_HD uint64_t stream_hash(uint64_t stream, int pixel) { return splitmix64(stream ^ static_cast<uint64_t>(pixel)); }
CM_HD uint64_t key_hash(uint64_t mixed_seed, int64_t roi, int set, int pixel) {
  return stream_hash(key_stream(mixed_seed, roi, set), pixel);
}

// k = min(c, ceil(sigma * c)), the product in IEEE double like Python's math.ceil(sigma * c).
CM_HD int sample_count(double sigma, int candidates) {
  const double k = ceil(sigma * static_cast<double>(candidates));
  return k < static_cast<double>(candidates) ? static_cast<int>(k) : candidates;
}

// Strict order used to pick the k smallest hashes: by hash, ties by pixel index.
CM_HD bool hash_before(uint64_t ha, int ia, uint64_t hb, int ib) {
  return ha < hb || (ha == hb && ia < ib);
}

// Bit mask of the candidate sets a pixel belongs to (SPEC step 3).
CM_HD uint8_t candidate_sets(int8_t label, int32_t sqdist, bool novel, int64_t hard_sqdist) {
  if (label == kForeground) {
    if (novel) return (1u << kEasyFg) | (1u << kHardFg);
    return static_cast<int64_t>(sqdist) <= hard_sqdist ? (1u << kHardFg) : (1u << kEasyFg);
  }
  if (label == kBackground) {
    if (novel) return (1u << kEasyBg) | (1u << kHardBg);
    return static_cast<int64_t>(sqdist) <= hard_sqdist ? (1u << kHardBg) : (1u << kEasyBg);
  }
  return 0;
}

// An ROI is kept iff every candidate set has >= min_keys pixels and both partitions are non-empty
// (the second condition only matters for min_keys = 0).
CM_HD bool roi_kept(const int* set_counts, int foreground, int background, int64_t min_keys) {
  if (foreground == 0 || background == 0) return false;
  for (int s = 0; s < kNumSets; ++s)
    if (set_counts[s] < min_keys) return false;
  return true;
}

// Partition label of one pixel (SPEC step 1). Thresholds are already rounded to the CAM's dtype and
// compared in T (float, or double for double CAMs), as `cams >= 1 - delta` does in PyTorch.
template <typename T>
CM_HD int8_t partition_label(bool valid, bool novel, bool mask_on, T cam, T thr_fg, T thr_bg) {
  if (!valid) return kIgnored;
  if (!novel) return mask_on ? kForeground : kBackground;
  if (cam >= thr_fg) return kForeground;
  if (cam <= thr_bg) return kBackground;
  return kIgnored;
}

}  // namespace contrastmask
