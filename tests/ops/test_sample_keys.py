"""sample_keys: the reference against pure-Python splitmix64 and SPEC's selection (counts, seeds, roi_offset,
uniformity, min_keys), the kernels' exact counts on every device and uniformity over seeds, and roi_offset's
int64 limit on both paths. The fused plan samples the same keys: test_roi_plan.py."""
import math
import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import torch

import contrastmask_ops as cm
from blobs import blob_batch
from cases import IMPLS, needs_kernels, reference_plan
from contrastmask_ops import reference as ref

M64 = 2**64


def py_splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) % M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) % M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) % M64
    return x ^ (x >> 31)


def py_key_hash(seed: int, n: int, s: int, i: int) -> int:
    return py_splitmix64(py_splitmix64(seed % M64) ^ (((n * 4 + s) << 20) | i))


def test_splitmix64_known_value():
    # Vigna's splitmix64 with state 0 gives 0xE220A8397B1DCDAF as its first output.
    assert int(ref.splitmix64(np.uint64(0))) == 0xE220A8397B1DCDAF == py_splitmix64(0)


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**63 - 1, 2**63, 2**64 - 1, -1, -2**63, -987654321, 3 * 2**64 + 7])
def test_key_hash_matches_python_ints(seed):
    ns, ss, iis = np.array([0, 1, 7, 511, 2**20]), np.array([0, 3, 1, 2, 3]), np.array([0, 4095, 17, 1, 2**20 - 1])
    got = ref.key_hash(seed, ns, ss, iis)
    assert got.dtype == np.uint64
    want = [py_key_hash(seed, int(n), int(s), int(i)) for n, s, i in zip(ns, ss, iis)]
    assert [int(v) for v in got] == want
    vals = np.array([0, 1, 2**63, 2**64 - 1, seed % M64], dtype=np.uint64)
    assert [int(v) for v in ref.splitmix64(vals)] == [py_splitmix64(int(v)) for v in vals]


def candidate_lists(labels, sqdist, is_novel, hard_sqdist):
    """Per ROI and set, the candidate pixel indices, straight from SPEC step 3."""
    out = []
    for lab, d, nov in zip(labels.flatten(1).tolist(), sqdist.flatten(1).tolist(), is_novel.tolist()):
        fg = [i for i, v in enumerate(lab) if v == 1]
        bg = [i for i, v in enumerate(lab) if v == 0]
        if nov:
            out.append([fg, fg, bg, bg])
        else:
            out.append([[i for i in fg if d[i] > hard_sqdist], [i for i in fg if d[i] <= hard_sqdist],
                        [i for i in bg if d[i] > hard_sqdist], [i for i in bg if d[i] <= hard_sqdist]])
    return out


@pytest.mark.parametrize("sigma,hard_sqdist,min_keys", [(0.3, 2, 5), (1.0, 0, 1), (0.05, 5, 0), (0.7, -1, 0),
                                                        (0.5, 2**40, 0), (0.5, -2**40, 0)])
def test_matches_python_selection(sigma, hard_sqdist, min_keys):
    batch = blob_batch(24, 11, 9, 1, seed=7)
    labels, sqdist = reference_plan(batch)
    seed = 2**63 + 12345
    keys, keep = ref.sample_keys(labels, sqdist, batch["is_novel"], sigma=sigma, hard_sqdist=hard_sqdist,
                                 min_keys=min_keys, seed=seed)
    assert keys.dtype == torch.uint8 and keep.dtype == torch.bool
    cands = candidate_lists(labels, sqdist, batch["is_novel"], hard_sqdist)
    keys_flat = keys.flatten(1).tolist()
    for n, sets in enumerate(cands):
        fg_any = any(v == 1 for v in labels[n].flatten().tolist())
        bg_any = any(v == 0 for v in labels[n].flatten().tolist())
        want_keep = all(len(c) >= min_keys for c in sets) and fg_any and bg_any
        assert bool(keep[n]) == want_keep
        for s, c in enumerate(sets):
            got = sorted(i for i, v in enumerate(keys_flat[n]) if v >> s & 1)
            if not want_keep:
                assert got == []
                continue
            k = min(len(c), math.ceil(sigma * len(c)))
            want = sorted(sorted(c, key=lambda i: (py_key_hash(seed, n, s, i), i))[:k])
            assert got == want
    if min_keys == 5:
        assert keep.any() and not keep.all()


@pytest.mark.parametrize("sigma,c,k", [(0.3, 10, 3), (0.55, 100, 56), (0.55, 99, 55), (1.0, 7, 7), (1e-9, 3, 1)])
def test_count_rule_float_product(sigma, c, k):
    # k = ceil(sigma * c) with the product in double: 0.55 * 100 = 55.00000000000001 -> 56
    labels = torch.full((1, 10, 20), -1, dtype=torch.int8)
    labels.view(-1)[:c] = 1
    labels.view(-1)[c:2 * c] = 0
    novel = torch.ones(1, dtype=torch.bool)
    keys, keep = ref.sample_keys(labels, torch.zeros(1, 10, 20, dtype=torch.int32), novel, sigma=sigma, min_keys=1,
                                 seed=3)
    assert keep.item()
    counts = [int(((keys >> s) & 1).sum()) for s in range(4)]
    assert counts == [k, k, k, k]
    # novel: easy/hard fg keys lie on fg, bg keys on bg
    assert (((keys & 0b0011) != 0) <= (labels == 1)).all() and (((keys & 0b1100) != 0) <= (labels == 0)).all()


def test_seeds():
    batch = blob_batch(16, 14, 14, 1, seed=1)
    labels, sqdist = reference_plan(batch)
    nov = batch["is_novel"]
    a, ka = ref.sample_keys(labels, sqdist, nov, seed=5)
    b, kb = ref.sample_keys(labels, sqdist, nov, seed=5)
    c, _ = ref.sample_keys(labels, sqdist, nov, seed=6)
    d, _ = ref.sample_keys(labels, sqdist, nov, seed=5 - 2**64)
    e, _ = ref.sample_keys(labels, sqdist, nov, seed=np.int64(5))
    assert torch.equal(a, b) and torch.equal(ka, kb) and torch.equal(a, d) and torch.equal(a, e)
    assert not torch.equal(a, c)
    # seed=None draws from torch's default generator
    torch.manual_seed(11)
    f, _ = ref.sample_keys(labels, sqdist, nov)
    torch.manual_seed(11)
    drawn = int(torch.randint(0, 2**63 - 1, ()).item())
    g, _ = ref.sample_keys(labels, sqdist, nov, seed=drawn)
    h, _ = ref.sample_keys(labels, sqdist, nov)
    assert torch.equal(f, g) and not torch.equal(f, h)


@pytest.mark.parametrize("roi_offset", [0, 3, 2**40])
def test_roi_offset_hashes_n_plus_offset(roi_offset):
    """SPEC step 4 with the ROI index n + roi_offset, checked against Python ints; and a slice [a:b] sampled
    with roi_offset=a gets the keys of rows [a:b] of the whole batch."""
    batch = blob_batch(12, 11, 9, 1, seed=8)
    labels, sqdist = reference_plan(batch)
    nov, seed = batch["is_novel"], 2**63 + 99
    keys, keep = ref.sample_keys(labels, sqdist, nov, min_keys=1, seed=seed, roi_offset=roi_offset)
    cands = candidate_lists(labels, sqdist, nov, 2)
    keys_flat = keys.flatten(1).tolist()
    for n, sets in enumerate(cands):
        if not keep[n]:
            continue
        for s, c in enumerate(sets):
            k = min(len(c), math.ceil(0.3 * len(c)))
            want = sorted(sorted(c, key=lambda i: (py_key_hash(seed, n + roi_offset, s, i), i))[:k])
            assert sorted(i for i, v in enumerate(keys_flat[n]) if v >> s & 1) == want
    assert keep.sum() >= 6
    whole_keys, whole_keep = ref.sample_keys(labels, sqdist, nov, min_keys=1, seed=seed)
    for a, e in [(0, 4), (4, 4), (4, 12), (11, 12)]:
        part_keys, part_keep = ref.sample_keys(labels[a:e], sqdist[a:e], nov[a:e], min_keys=1, seed=seed, roi_offset=a)
        assert torch.equal(part_keys, whole_keys[a:e]) and torch.equal(part_keep, whole_keep[a:e]), (a, e)


def test_reference_is_uniform_over_seeds():
    # One novel ROI with 12 fg and 24 bg candidates: over many seeds every candidate of a set is
    # picked about equally often.
    labels = torch.full((1, 6, 7), -1, dtype=torch.int8)
    labels.view(-1)[:12] = 1
    labels.view(-1)[12:36] = 0
    sqdist = torch.zeros(1, 6, 7, dtype=torch.int32)
    novel = torch.ones(1, dtype=torch.bool)
    trials = 2000
    freq = np.zeros((4, 42))
    for seed in range(trials):
        keys, keep = ref.sample_keys(labels, sqdist, novel, sigma=0.3, seed=seed * 7919 + 2**62)
        assert keep.item()
        bits = (keys.view(1, -1) >> torch.arange(4, dtype=torch.uint8).view(4, 1)) & 1
        freq += bits.numpy()
    assert (freq[:2, 12:] == 0).all() and (freq[2:, :12] == 0).all() and (freq[:, 36:] == 0).all()
    for s, (lo, hi, k) in enumerate([(0, 12, 4), (0, 12, 4), (12, 36, 8), (12, 36, 8)]):
        counts = freq[s, lo:hi]
        assert counts.sum() == trials * k
        assert scipy.stats.chisquare(counts).pvalue > 1e-4
    # easy and hard fg samples are independent draws
    assert not np.array_equal(freq[0], freq[1])


def test_min_keys_rule():
    # ROI 0: base, every set has 6 pixels. ROI 1: base, fg of 1 pixel. ROI 2: all background.
    # ROI 3: invalid (all -1). ROI 4: novel with 5 fg, 5 bg.
    h, w = 6, 6
    labels = torch.zeros(5, h, w, dtype=torch.int8)
    sqdist = torch.full((5, h, w), 100, dtype=torch.int32)
    lab0, sq0 = labels[0].view(-1), sqdist[0].view(-1)
    lab0[:12] = 1
    sq0[6:18] = 0  # EF = 0..5, HF = 6..11, HB = 12..17, EB = 18..35
    labels[1, 0, 0] = 1
    sqdist[1, 0, :2] = 1
    labels[3] = -1
    labels[4] = -1
    labels[4].view(-1)[:5] = 1
    labels[4].view(-1)[5:10] = 0
    novel = torch.tensor([False, False, False, False, True])
    for min_keys, want in [(6, [True, False, False, False, False]), (5, [True, False, False, False, True]),
                           (7, [False] * 5), (0, [True, True, False, False, True]),
                           (1, [True, False, False, False, True])]:
        keys, keep = ref.sample_keys(labels, sqdist, novel, min_keys=min_keys, seed=1)
        assert keep.tolist() == want, min_keys
        assert (keys[~keep] == 0).all()
        assert (keys[keep].flatten(1) != 0).any(dim=1).all()


def test_empty_batch():
    keys, keep = ref.sample_keys(torch.zeros(0, 3, 4, dtype=torch.int8), torch.zeros(0, 3, 4, dtype=torch.int32),
                                 torch.zeros(0, dtype=torch.bool), seed=0)
    assert keys.shape == (0, 3, 4) and keep.shape == (0,)


@needs_kernels
@pytest.mark.parametrize("seed", range(4))
def test_sample_counts_are_exact(device, seed):
    """The kernels pick ceil(sigma * c) of a set's c candidates, and only candidates, on every device."""
    b = device.batch(blob_batch(32, 28, 28, 1, seed=seed))
    labels = cm.partition(b["masks"], b["cams"], b["is_novel"])
    sqdist = cm.boundary_sqdist(b["masks"])
    keys, keep = cm.sample_keys(labels, sqdist, b["is_novel"], sigma=0.3, min_keys=0, seed=seed)
    labels, sqdist, keys, keep = labels.cpu(), sqdist.cpu(), keys.cpu(), keep.cpu()
    cand = ref.candidate_sets(labels, sqdist, b["is_novel"].cpu(), 2)  # (N, 4, H*W) bool
    for n in range(32):
        for s in range(4):
            picked = ((keys[n].flatten() >> s) & 1).bool()
            c = int(cand[n, s].sum())
            expected = min(c, math.ceil(0.3 * c)) if keep[n] else 0
            assert int(picked.sum()) == expected
            assert not (picked & ~cand[n, s]).any()


@needs_kernels
def test_kernels_are_uniform_over_seeds():
    # Every candidate of a set should be picked about equally often across seeds (chi-square).
    from scipy.stats import chisquare

    b = blob_batch(8, 28, 28, 1, seed=11)
    novel = torch.zeros(8, dtype=torch.bool)
    labels = cm.partition(b["masks"], None, novel)
    sqdist = cm.boundary_sqdist(b["masks"])
    cand = ref.candidate_sets(labels, sqdist, novel, 2)
    n = int(cm.sample_keys(labels, sqdist, novel, min_keys=5, seed=0)[1].nonzero()[0])
    seeds = 800
    hits = torch.zeros(4, 28 * 28)
    for seed in range(seeds):
        keys, keep = cm.sample_keys(labels, sqdist, novel, sigma=0.3, min_keys=5, seed=seed)
        assert keep[n]  # keep does not depend on the seed
        hits += ((keys[n].flatten() >> torch.arange(4)[:, None]) & 1).float()
    for s in range(4):
        observed = hits[s][cand[n, s]].numpy()
        assert len(observed) >= 5 and observed.sum() > 0
        assert chisquare(observed).pvalue > 1e-4, s


def test_roi_offset_limit_is_int64_on_both_paths():
    """roi_offset: every ROI's index roi_offset + n must fit in int64 (the operators' integer type), on both
    paths, with one ValueError each (the reference's uint64 hash could take more, and past int64 the op's
    dispatcher would raise a TypeError of its own)."""
    b = blob_batch(4, 14, 14, 8, seed=0)
    labels, sqdist = reference_plan(b)
    impls = [p.values[0] for p in IMPLS]
    last = 2**63 - 4  # the largest offset for N = 4: the last ROI's index is 2**63 - 1
    got = [impl.sample_keys(labels, sqdist, b["is_novel"], min_keys=1, seed=9, roi_offset=last) for impl in impls]
    for keys, keep in got[1:]:
        assert torch.equal(keys, got[0][0]) and torch.equal(keep, got[0][1])
    empty = [t[:0] for t in (labels, sqdist, b["is_novel"])]
    messages = set()
    for impl in impls:
        impl.sample_keys(*empty, roi_offset=2**63 - 1)  # N = 0: any int64
        for roi_offset, tensors, n in ((last + 1, (labels, sqdist, b["is_novel"]), 4), (2**63, empty, 0),
                                       (2**70, (labels, sqdist, b["is_novel"]), 4)):
            with pytest.raises(ValueError) as info:
                impl.sample_keys(*tensors, seed=0, roi_offset=roi_offset)
            message = str(info.value)
            assert message == (f"roi_offset must lie in [0, 2**63 - max(N, 1)] (every ROI's index roi_offset + n, "
                               f"n < N, fits in int64), got {roi_offset} with N = {n}"), message
            messages.add(message)
    assert len(messages) == 3  # one wording per case, whichever path
