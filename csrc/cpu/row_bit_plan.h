// The fused CPU plan (partition + hard band + sampling) for grids with W <= 64, on row bitmasks.
// Same output as partition -> boundary_sqdist -> sample_keys, at a fraction of the cost:
// - the hard band is a dilation of the boundary rows (row_bits.h), not a full EDT;
// - the candidate sets are four bitmask images, counted with popcount;
// - a set sampled whole (k == c) needs no hashes; otherwise the k smallest (hash, pixel) pairs are
//   found by one bucket pass on the hash's top bits and a sort of the single bucket that straddles k.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "../contrastmask/row_bits.h"
#include "../contrastmask/sampling.h"
#include "../ops/checks.h"
#include "plan_job.h"

namespace contrastmask {

struct RowBitScratch {
  RowBitScratch(int H, int P)
      : fg(H), bg(H), boundary(H), band(H), hashes(P), pixels(P), straddlers(P), buckets(size_t(1) << 12) {}
  std::vector<uint64_t> fg, bg, boundary, band;
  std::vector<uint64_t> hashes;
  std::vector<uint16_t> pixels;
  std::vector<uint16_t> straddlers;
  std::vector<uint32_t> buckets;
};

// Bucket count of a set of c candidates: about two per bucket, 16..4096 buckets (the hash's top bits).
inline int bucket_bits(int c) {
  int bits = 4;
  while (bits < 12 && (1 << (bits + 1)) <= c) ++bits;
  return bits;
}

// Samples set s of ROI n from its row bitmasks (SPEC step 4) into keys[]: the k smallest
// (hash, pixel) pairs. One pass hashes the candidates and counts them per bucket of the hash's top
// bits; a second marks every candidate of the buckets below the one holding the k-th smallest, and
// sorts the few candidates of that one bucket to finish.
template <typename Job>
void sample_set_rows(const Job& job, int64_t n, int s, const uint64_t* rows, int c, RowBitScratch& sc,
                     uint8_t* keys) {
  const int k = sample_count(job.sigma, c);
  const uint8_t bit = uint8_t(1u << s);
  if (k >= c) {  // the whole set: no hashes needed
    for (int y = 0; y < job.H; ++y)
      for (uint64_t r = rows[y]; r; r &= r - 1) keys[y * job.W + cm_ctz64(r)] |= bit;
    return;
  }
  const int bits = bucket_bits(c), shift = 64 - bits;
  uint32_t* count = sc.buckets.data();
  std::fill_n(count, size_t(1) << bits, 0u);
  uint64_t* hashes = sc.hashes.data();
  uint16_t* pixels = sc.pixels.data();
  const uint64_t stream = key_stream(job.mixed_seed, n + job.roi_offset, s);
  int j = 0;
  for (int y = 0; y < job.H; ++y)
    for (uint64_t r = rows[y]; r; r &= r - 1) {
      const int i = y * job.W + cm_ctz64(r);
      const uint64_t h = stream_hash(stream, i);
      hashes[j] = h;
      pixels[j++] = static_cast<uint16_t>(i);
      ++count[h >> shift];
    }
  // The bucket holding the k-th smallest hash, and how many candidates lie in buckets below it.
  int cut = 0, below = 0;
  while (below + static_cast<int>(count[cut]) < k) below += static_cast<int>(count[cut++]);
  // Branch-free: "below the cut" is a coin flip per candidate, which a branch would mispredict.
  uint16_t* straddlers = sc.straddlers.data();  // candidates (list positions) in the cut bucket
  int m = 0;
  for (j = 0; j < c; ++j) {
    const int b = static_cast<int>(hashes[j] >> shift);
    keys[pixels[j]] |= bit & static_cast<uint8_t>(-static_cast<int>(b < cut));
    straddlers[m] = static_cast<uint16_t>(j);
    m += b == cut;
  }
  auto before = [&](uint16_t a, uint16_t b) { return hash_before(hashes[a], pixels[a], hashes[b], pixels[b]); };
  const int rest = k - below;  // 1 <= rest <= m
  std::partial_sort(straddlers, straddlers + rest, straddlers + m, before);
  for (j = 0; j < rest; ++j) keys[pixels[straddlers[j]]] |= bit;
}

// Labels and foreground/background rows of one ROI; returns whether its mask holds only 0 and 1.
// The ROI's kind is a template parameter, so partition_label folds to one comparison per pixel.
template <bool kValid, bool kNovel, typename mask_t, typename cam_t>
bool label_rows_of(const mask_t* mask, const cam_t* cam, int H, int W, cam_t thr_fg, cam_t thr_bg,
                   RowBitScratch& sc, int8_t* labels) {
  bool binary = true;
  for (int y = 0; y < H; ++y) {
    uint64_t fg = 0, bg = 0;
    for (int x = 0; x < W; ++x) {
      const int i = y * W + x;
      const mask_t v = mask[i];
      const bool on = v != mask_t(0);
      binary &= !on || v == mask_t(1);
      const int8_t label = partition_label(kValid, kNovel, on, kNovel ? cam[i] : thr_fg, thr_fg, thr_bg);
      labels[i] = label;
      fg |= uint64_t(label == kForeground) << x;
      bg |= uint64_t(label == kBackground) << x;
    }
    sc.fg[y] = fg;
    sc.bg[y] = bg;
  }
  return binary;
}

// label_rows_of for ROI n of the job, by its kind; returns plan error bits.
template <typename Job>
int32_t label_rows(const Job& job, int64_t n, bool valid, bool novel, RowBitScratch& sc, int8_t* labels) {
  const int H = job.H, W = job.W;
  const int64_t P = int64_t(H) * W;
  const auto* mask = job.masks + n * P;
  // Only novel ROIs read their CAM (half the bytes of a typical batch are CAMs of base ROIs).
  const auto* cam = job.cams ? job.cams + n * P : nullptr;
  if (novel && !cam) {  // reported; label as a base ROI meanwhile (the call raises)
    const bool binary = label_rows_of<true, false>(mask, cam, H, W, job.thr_fg, job.thr_bg, sc, labels);
    return kMissingCams | (binary ? 0 : kMaskNotBinary);
  }
  bool binary;
  if (!valid) binary = label_rows_of<false, false>(mask, cam, H, W, job.thr_fg, job.thr_bg, sc, labels);
  else if (novel) binary = label_rows_of<true, true>(mask, cam, H, W, job.thr_fg, job.thr_bg, sc, labels);
  else binary = label_rows_of<true, false>(mask, cam, H, W, job.thr_fg, job.thr_bg, sc, labels);
  return binary ? 0 : kMaskNotBinary;
}

// Fills the band rows of a base ROI: pixels whose squared boundary distance is <= hard_sqdist.
// radius: the disk table of min(hard_sqdist, largest distance in the grid); empty when hard_sqdist < 0.
inline void band_rows(int H, int W, int64_t hard_sqdist, const std::vector<int>& radius, RowBitScratch& sc) {
  uint64_t any = 0;
  for (int y = 0; y < H; ++y) any |= sc.boundary[y] = boundary_row(sc.fg.data(), H, W, y);
  if (!any || hard_sqdist < 0) {  // no boundary: every distance is INT32_MAX
    const uint64_t fill = (!any && hard_sqdist >= kNoBoundary) ? row_full(W) : 0;
    std::fill(sc.band.begin(), sc.band.begin() + H, fill);
    return;
  }
  const int reach = static_cast<int>(radius.size()) - 1;
  for (int y = 0; y < H; ++y) sc.band[y] = hard_band_row(sc.boundary.data(), H, W, y, radius.data(), reach);
}

// roi_plan for W <= 64; returns plan error bits. job.labels_out, keys_out and keep_out are set.
template <typename Job>
int32_t run_row_bit_plan(const Job& job) {
  const int H = job.H, W = job.W;
  const int64_t P = int64_t(H) * W;
  // No distance exceeds (H-1)^2 + (W-1)^2, so a larger hard_sqdist gives the same band.
  const int64_t max_sqdist = int64_t(H - 1) * (H - 1) + int64_t(W - 1) * (W - 1);
  const int64_t band_sqdist = std::min(job.hard_sqdist, max_sqdist);
  std::vector<int> radius;  // radius[d] = isqrt(band_sqdist - d^2), d = 0..isqrt(band_sqdist)
  for (int64_t d = 0; band_sqdist >= 0 && d * d <= band_sqdist; ++d)
    radius.push_back(static_cast<int>(isqrt(band_sqdist - d * d)));
  std::atomic<int32_t> errors{0};
  at::parallel_for(0, job.N, 1, [&](int64_t begin, int64_t end) {
    RowBitScratch sc(H, static_cast<int>(P));
    int32_t local_errors = 0;
    for (int64_t n = begin; n < end; ++n) {
      const bool novel = job.is_novel[n];
      const bool valid = job.valid ? job.valid[n] : true;
      uint8_t* keys = job.keys_out + n * P;
      std::fill_n(keys, static_cast<size_t>(P), uint8_t(0));
      const int32_t roi_errors = label_rows(job, n, valid, novel, sc, job.labels_out + n * P);
      local_errors |= roi_errors;
      job.keep_out[n] = false;
      if (!valid || roi_errors) continue;
      const uint64_t full = row_full(W);
      // Candidate sets as row bitmasks (SPEC step 3); novel ROIs share fg/bg between easy and hard.
      const uint64_t* sets[kNumSets] = {sc.fg.data(), sc.fg.data(), sc.bg.data(), sc.bg.data()};
      if (!novel) {
        band_rows(H, W, job.hard_sqdist, radius, sc);
        // The four sets overwrite the scratch rows in place: easy-fg in boundary, hard-fg in fg,
        // easy-bg in bg, hard-bg in band.
        for (int y = 0; y < H; ++y) {
          const uint64_t fg = sc.fg[y], bg = ~fg & full, band = sc.band[y];
          sc.boundary[y] = fg & ~band;  // easy-fg
          sc.fg[y] = fg & band;         // hard-fg
          sc.bg[y] = bg & ~band;        // easy-bg
          sc.band[y] = bg & band;       // hard-bg
        }
        sets[kEasyFg] = sc.boundary.data();
        sets[kHardBg] = sc.band.data();
      }
      int counts[kNumSets] = {0, 0, 0, 0};
      for (int s = 0; s < kNumSets; ++s)
        for (int y = 0; y < H; ++y) counts[s] += cm_popcount64(sets[s][y]);
      const int foreground = novel ? counts[kEasyFg] : counts[kEasyFg] + counts[kHardFg];
      const int background = novel ? counts[kEasyBg] : counts[kEasyBg] + counts[kHardBg];
      if (!roi_kept(counts, foreground, background, job.min_keys)) continue;
      for (int s = 0; s < kNumSets; ++s) sample_set_rows(job, n, s, sets[s], counts[s], sc, keys);
      job.keep_out[n] = true;
    }
    if (local_errors) errors.fetch_or(local_errors);
  });
  return errors.load();
}

}  // namespace contrastmask
