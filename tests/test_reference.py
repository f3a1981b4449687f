"""contrastmask_ops.reference against independent oracles: scipy's EDT, pure-Python splitmix64 and
selection, and a naive per-ROI loop of SPEC.md's loss formulas."""
import math

import numpy as np
import pytest
import scipy.ndimage
import scipy.stats
import torch

import contrastmask_ops.reference as ref
from blobs import blob_masks, blob_batch

INT32_MAX = 2**31 - 1
M64 = 2**64


# ------------------------------------------------------------------------------------------------
# boundary_sqdist
# ------------------------------------------------------------------------------------------------

def naive_boundary(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    b = np.zeros_like(mask, dtype=bool)
    for r in range(h):
        for c in range(w):
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                rr, cc = r + dr, c + dc
                if 0 <= rr < h and 0 <= cc < w and mask[rr, cc] != mask[r, c]:
                    b[r, c] = True
    return b


def scipy_sqdist(mask: np.ndarray) -> np.ndarray:
    """Exact squared EDT to the boundary from scipy's nearest-boundary-pixel indices."""
    b = naive_boundary(mask) if mask.size <= 1024 else np.asarray(ref.boundary_pixels(torch.from_numpy(mask)[None])[0])
    if not b.any():
        return np.full(mask.shape, INT32_MAX, dtype=np.int64)
    idx = scipy.ndimage.distance_transform_edt(~b, return_distances=False, return_indices=True)
    rows, cols = np.indices(mask.shape)
    return (rows - idx[0]) ** 2 + (cols - idx[1]) ** 2


def test_boundary_pixels_match_definition():
    g = torch.Generator().manual_seed(1)
    masks = blob_masks(20, 9, 13, generator=g)
    got = ref.boundary_pixels(masks)
    for m, b in zip(masks.numpy(), got.numpy()):
        np.testing.assert_array_equal(b, naive_boundary(m))


@pytest.mark.parametrize("h,w", [(28, 28), (13, 21), (21, 13), (1, 17), (17, 1), (1, 1), (2, 2), (64, 64),
                                 (1, 4096), (4096, 1), (5, 700)])
def test_boundary_sqdist_matches_scipy(h, w):
    g = torch.Generator().manual_seed(h * 10007 + w)
    n = 12 if h * w <= 1024 else 3
    masks = blob_masks(n, h, w, generator=g, empty_frac=0.1, full_frac=0.1)
    masks[0] = torch.rand(h, w, generator=g) < 0.5  # salt and pepper
    got = ref.boundary_sqdist(masks)
    assert got.dtype == torch.int32 and got.shape == (n, h, w)
    for m, d in zip(masks.numpy(), got.numpy()):
        np.testing.assert_array_equal(d.astype(np.int64), scipy_sqdist(m))


def test_boundary_sqdist_special_masks():
    masks = torch.zeros(4, 7, 9, dtype=torch.uint8)
    masks[1] = 1  # all 1
    masks[2, 3, 4] = 1  # single pixel: boundary = the pixel and its 4 neighbours
    masks[3, 0, :] = 1  # a border row
    d = ref.boundary_sqdist(masks)
    assert (d[0] == INT32_MAX).all() and (d[1] == INT32_MAX).all()
    assert d[2, 3, 4] == 0 and d[2, 2, 4] == 0 and d[2, 3, 5] == 0 and d[2, 2, 3] == 1
    assert d[2, 0, 0] == 3 ** 2 + 3 ** 2  # nearest boundary pixel: (3, 3)
    assert d[3, 0, 5] == 0 and d[3, 1, 5] == 0 and d[3, 2, 5] == 1 and d[3, 6, 0] == 25
    for m, dd in zip(masks.numpy(), d.numpy()):
        np.testing.assert_array_equal(dd.astype(np.int64), scipy_sqdist(m))


def test_boundary_sqdist_empty_batch_and_float_masks():
    assert ref.boundary_sqdist(torch.zeros(0, 5, 6)).shape == (0, 5, 6)
    g = torch.Generator().manual_seed(3)
    masks = blob_masks(5, 10, 12, generator=g)
    torch.testing.assert_close(ref.boundary_sqdist(masks.to(torch.float16)), ref.boundary_sqdist(masks))


# ------------------------------------------------------------------------------------------------
# partition
# ------------------------------------------------------------------------------------------------

def test_partition_base_novel_invalid():
    masks = torch.tensor([[[0, 1, 1]], [[1, 1, 0]], [[1, 0, 1]]], dtype=torch.uint8)
    cams = torch.tensor([[[0.95, 0.05, 0.5]], [[0.95, 0.05, 0.5]], [[0.0, 1.0, 0.5]]])
    is_novel = torch.tensor([False, True, False])
    got = ref.partition(masks, cams, is_novel)
    assert got.dtype == torch.int8
    assert got.tolist() == [[[0, 1, 1]], [[1, 0, -1]], [[1, 0, 1]]]
    valid = torch.tensor([True, False, True])
    got = ref.partition(masks, cams, is_novel, valid=valid)
    assert got.tolist() == [[[0, 1, 1]], [[-1, -1, -1]], [[1, 0, 1]]]
    # cams may be None when no ROI is novel; float masks work
    got = ref.partition(masks.float(), None, torch.zeros(3, dtype=torch.bool))
    assert got.tolist() == [[[0, 1, 1]], [[1, 1, 0]], [[1, 0, 1]]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("delta", [0.1, 0.25, 0.3])
def test_partition_thresholds_in_cam_dtype(dtype, delta):
    hi = torch.tensor(1 - delta, dtype=dtype)
    lo = torch.tensor(delta, dtype=dtype)
    inf = torch.tensor(math.inf, dtype=dtype)
    values = torch.stack([hi, torch.nextafter(hi, -inf), lo, torch.nextafter(lo, inf),
                          torch.tensor(0.5, dtype=dtype), torch.tensor(0.0, dtype=dtype),
                          torch.tensor(1.0, dtype=dtype)]).view(1, 1, -1)
    got = ref.partition(torch.zeros(values.shape, dtype=torch.bool), values, torch.ones(1, dtype=torch.bool),
                        delta=delta)
    assert got.flatten().tolist() == [1, -1, 0, -1, -1, 0, 1]


def test_partition_delta_edges():
    cams = torch.tensor([[[0.0, 0.5, 1.0, 0.25]]])
    novel = torch.ones(1, dtype=torch.bool)
    masks = torch.zeros(1, 1, 4)
    assert ref.partition(masks, cams, novel, delta=0.5).flatten().tolist() == [0, 1, 1, 0]  # fg tested first
    assert ref.partition(masks, cams, novel, delta=0.0).flatten().tolist() == [0, -1, 1, -1]


def test_partition_nan_in_a_novel_cam_is_an_error_unchecked_ignored_and_base_cam_unused():
    masks = torch.tensor([[[1, 0]], [[1, 0]]], dtype=torch.bool)
    cams = torch.tensor([[[math.nan, 0.0]], [[math.nan, math.nan]]])
    with pytest.raises(ValueError, match="^cams: expected no NaN in the CAM of a novel ROI, got NaN in ROI 0$"):
        ref.partition(masks, cams, torch.tensor([True, False]))
    got = ref.partition(masks, cams, torch.tensor([True, False]), check_inputs=False)
    assert got.tolist() == [[[-1, 0]], [[1, 0]]]
    got = ref.partition(masks, cams, torch.tensor([False, False]))  # base ROIs' CAMs are never read
    assert got.tolist() == [[[1, 0]], [[1, 0]]]


# ------------------------------------------------------------------------------------------------
# sample_keys
# ------------------------------------------------------------------------------------------------

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


def plan(batch, **kw):
    labels = ref.partition(batch["masks"], batch["cams"], batch["is_novel"])
    sqdist = ref.boundary_sqdist(batch["masks"])
    return labels, sqdist


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
def test_sample_keys_matches_python_selection(sigma, hard_sqdist, min_keys):
    batch = blob_batch(24, 11, 9, 1, seed=7)
    labels, sqdist = plan(batch)
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
def test_sample_keys_count_rule_float_product(sigma, c, k):
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


def test_sample_keys_seeds():
    batch = blob_batch(16, 14, 14, 1, seed=1)
    labels, sqdist = plan(batch)
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
def test_sample_keys_roi_offset_hashes_roi_n_as_n_plus_offset(roi_offset):
    """SPEC step 4 with the ROI index n + roi_offset, checked against Python ints; and a slice [a:b] sampled
    with roi_offset=a gets the keys of rows [a:b] of the whole batch."""
    batch = blob_batch(12, 11, 9, 1, seed=8)
    labels, sqdist = plan(batch)
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


def test_sample_keys_uniform_over_seeds():
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


def test_sample_keys_min_keys_rule():
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


def test_sample_keys_empty_batch():
    keys, keep = ref.sample_keys(torch.zeros(0, 3, 4, dtype=torch.int8), torch.zeros(0, 3, 4, dtype=torch.int32),
                                 torch.zeros(0, dtype=torch.bool), seed=0)
    assert keys.shape == (0, 3, 4) and keep.shape == (0,)


# ------------------------------------------------------------------------------------------------
# loss: a naive per-ROI loop of SPEC's formulas (float64) as the oracle
# ------------------------------------------------------------------------------------------------

def naive_cos(q, x):
    return (x @ q) / (torch.clamp_min(q.norm(), 1e-8) * torch.clamp_min(x.norm(dim=1), 1e-8))


def naive_term(q, pos, neg, t, formulation):
    """T(q, P, G, t) of SPEC step 6; pos, neg are (k, C) tensors of key features."""
    if pos.shape[0] == 0:
        return q.new_zeros(())
    if formulation == "released":
        pos, neg = pos - q, neg - q
    s_pos, s_neg = naive_cos(q, pos), naive_cos(q, neg)
    own = s_pos / t if formulation == "paper" else s_pos
    total = q.new_zeros(())
    for j in range(pos.shape[0]):
        total = total + torch.log(torch.exp(own[j]) + torch.exp(s_neg / t).sum()) - s_pos[j] / t
    return total / pos.shape[0]


def naive_loss(z, labels, keys, keep, *, tau_easy=0.7, tau_hard=0.3, share_queries=True, formulation="paper"):
    z = z.double()
    n, c = z.shape[:2]
    feats = z.reshape(n, c, -1).transpose(1, 2)  # (N, P, C)
    lab = labels.reshape(n, -1)
    kb = keys.reshape(n, -1)
    kept = [i for i in range(n) if keep[i]]
    mus = {}
    sets = {}
    for i in kept:
        for side, value in ((0, 1), (1, 0)):
            part = feats[i][lab[i] == value]
            mus[i, side] = part.mean(dim=0) if part.shape[0] else None
        for s in range(4):
            sets[i, s] = feats[i][((kb[i] >> s) & 1) == 1]
    terms = [(0, 0, 2, tau_easy), (0, 1, 3, tau_hard), (1, 2, 0, tau_easy), (1, 3, 1, tau_hard)]

    def four_terms(q, key_sets):
        return sum(naive_term(q[side], key_sets[p], key_sets[g], t, formulation) for side, p, g, t in terms)

    if share_queries:
        q = []
        for side in (0, 1):
            present = [mus[i, side] for i in kept if mus[i, side] is not None]
            q.append(torch.stack(present).mean(dim=0) if present else z.new_zeros(c))
        pooled = [torch.cat([sets[i, s] for i in kept] + [z.new_zeros(0, c)]) for s in range(4)]
        return four_terms(q, pooled)
    if not kept:
        return z.new_zeros(())
    total = z.new_zeros(())
    for i in kept:
        q = [mus[i, side] if mus[i, side] is not None else z.new_zeros(c) for side in (0, 1)]
        total = total + four_terms(q, [sets[i, s] for s in range(4)])
    return total / len(kept)


def sampled(n, h, w, c, seed, dtype=torch.float64, min_keys=1, sigma=0.3):
    batch = blob_batch(n, h, w, c, seed=seed, dtype=dtype)
    labels, sqdist = plan(batch)
    keys, keep = ref.sample_keys(labels, sqdist, batch["is_novel"], sigma=sigma, min_keys=min_keys, seed=seed)
    return batch, labels, keys, keep


def loss_and_grad(fn, z, *args, **kw):
    z = z.detach().clone().requires_grad_(True)
    loss = fn(z, *args, **kw)
    (grad,) = torch.autograd.grad(loss, z)
    return loss.detach(), grad


PARAMS = [("paper", True, 0.7, 0.3), ("paper", False, 0.7, 0.3), ("released", True, 0.3, 0.7),
          ("released", False, 0.3, 0.7), ("paper", True, 0.05, 2.0)]


@pytest.mark.parametrize("formulation,share,tau_easy,tau_hard", PARAMS)
def test_loss_matches_naive_loop(formulation, share, tau_easy, tau_hard):
    batch, labels, keys, keep = sampled(7, 9, 11, 6, seed=21)
    assert keep.sum() >= 3
    kw = dict(tau_easy=tau_easy, tau_hard=tau_hard, share_queries=share, formulation=formulation)
    got, got_grad = loss_and_grad(ref.contrastive_loss_from_keys, batch["z"], labels, keys, keep, **kw)
    want, want_grad = loss_and_grad(naive_loss, batch["z"], labels, keys, keep, **kw)
    assert got.dtype == torch.float64 and got.shape == ()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("formulation,share", [("paper", True), ("paper", False), ("released", True),
                                               ("released", False)])
def test_loss_caller_made_keys_and_keep(formulation, share):
    # DESIGN's decisions "Queries for kept ROIs with an empty partition", "Keys of dropped ROIs", "A pixel
    # in several sets" and "Empty sets in the loss": a kept ROI with an empty partition, keys on ignored
    # pixels, keys of dropped ROIs, pixels in several sets, an empty negative set.
    batch, labels, keys, keep = sampled(6, 8, 8, 5, seed=4)
    labels, keys, keep = labels.clone(), keys.clone(), keep.clone()
    labels[0] = 0  # kept ROI without foreground
    labels[1, :2] = -1  # ignored pixels that are keys
    keys[1, :2] = 0b0101
    keep[2] = False
    keys[2] = 0b1111  # ignored: ROI dropped
    keys[3] |= 0b0011  # every pixel an EF and HF key
    kw = dict(share_queries=share, formulation=formulation)
    keep[0] = True
    got, got_grad = loss_and_grad(ref.contrastive_loss_from_keys, batch["z"], labels, keys, keep, **kw)
    want, want_grad = loss_and_grad(naive_loss, batch["z"], labels, keys, keep, **kw)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-10)
    # only hard-bg negatives missing: term B has positives and no negatives
    keys_nb = keys & ~torch.tensor(0b1000, dtype=torch.uint8)
    got, got_grad = loss_and_grad(ref.contrastive_loss_from_keys, batch["z"], labels, keys_nb, keep, **kw)
    want, want_grad = loss_and_grad(naive_loss, batch["z"], labels, keys_nb, keep, **kw)
    assert torch.isfinite(got) and torch.isfinite(got_grad).all()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("formulation", ["paper", "released"])
def test_loss_low_precision_dtypes(dtype, formulation):
    batch, labels, keys, keep = sampled(10, 12, 12, 16, seed=8, dtype=dtype)
    z = batch["z"]
    got, grad = loss_and_grad(ref.contrastive_loss_from_keys, z, labels, keys, keep, formulation=formulation)
    want, want_grad = loss_and_grad(ref.contrastive_loss_from_keys, z.double(), labels, keys, keep,
                                    formulation=formulation)
    assert got.dtype == dtype and grad.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(grad.double(), want_grad, rtol=tol, atol=tol * float(want_grad.abs().max()))


@pytest.mark.parametrize("share", [True, False])
def test_loss_no_kept_roi_is_zero_with_zero_grad(share):
    z = torch.randn(0, 4, 5, 5, requires_grad=True)
    loss = ref.contrastive_loss_from_keys(z, torch.zeros(0, 5, 5, dtype=torch.int8),
                                          torch.zeros(0, 5, 5, dtype=torch.uint8), torch.zeros(0, dtype=torch.bool),
                                          share_queries=share)
    loss.backward()
    assert loss.item() == 0 and z.grad is not None and z.grad.shape == z.shape
    batch, labels, keys, keep = sampled(4, 6, 6, 3, seed=2, dtype=torch.float32)
    z = batch["z"].clone()
    z[0, 0, 0, 0] = math.nan  # no effect: nothing is used
    z.requires_grad_(True)
    loss = ref.contrastive_loss_from_keys(z, labels, keys, torch.zeros_like(keep), share_queries=share)
    loss.backward()
    assert loss.item() == 0 and torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("formulation,share", [("paper", True), ("paper", False), ("released", True),
                                               ("released", False)])
def test_loss_zero_features_are_finite(formulation, share):
    batch, labels, keys, keep = sampled(5, 8, 8, 4, seed=5, dtype=torch.float32)
    for z in (torch.zeros_like(batch["z"]), batch["z"].clone().index_fill_(3, torch.tensor([0, 3]), 0.0)):
        loss, grad = loss_and_grad(ref.contrastive_loss_from_keys, z, labels, keys, keep,
                                   formulation=formulation, share_queries=share)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # features equal to the query ("released": z - q = 0)
    z = torch.ones_like(batch["z"])
    loss, grad = loss_and_grad(ref.contrastive_loss_from_keys, z, labels, keys, keep,
                               formulation=formulation, share_queries=share)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("tau", [1e-3, 1e3])
def test_loss_extreme_temperatures_are_finite(tau):
    batch, labels, keys, keep = sampled(5, 8, 8, 4, seed=6, dtype=torch.float32)
    loss, grad = loss_and_grad(ref.contrastive_loss_from_keys, batch["z"], labels, keys, keep,
                               tau_easy=tau, tau_hard=tau)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("share", [True, False])
def test_loss_nan_in_used_pixel_only(share):
    batch, labels, keys, keep = sampled(5, 8, 8, 4, seed=9, dtype=torch.float32)
    n = int(keep.nonzero()[0])
    used = (labels[n] >= 0) | (keys[n] != 0)
    clean = ref.contrastive_loss_from_keys(batch["z"], labels, keys, keep, share_queries=share)
    r, c = map(int, used.nonzero()[0])
    z = batch["z"].clone()
    z[n, 1, r, c] = math.nan
    assert torch.isnan(ref.contrastive_loss_from_keys(z, labels, keys, keep, share_queries=share))
    # a NaN in an ignored, non-key pixel (or a dropped ROI) has no effect
    labels = labels.clone()
    labels[n, r, c] = -1
    keys = keys.clone()
    keys[n, r, c] = 0
    z = batch["z"].clone()
    z[~keep] = math.nan
    z[n, :, r, c] = math.nan
    dirty = ref.contrastive_loss_from_keys(z, labels, keys, keep, share_queries=share)
    clean = ref.contrastive_loss_from_keys(batch["z"], labels, keys, keep, share_queries=share)
    assert torch.isfinite(dirty) and dirty.item() == clean.item()


@pytest.mark.parametrize("formulation,share", [("paper", True), ("paper", False), ("released", True),
                                               ("released", False)])
def test_loss_gradcheck(formulation, share):
    batch, labels, keys, keep = sampled(3, 4, 5, 3, seed=13, min_keys=1, sigma=0.6)
    z = batch["z"].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: ref.contrastive_loss_from_keys(x, labels, keys, keep, formulation=formulation,
                                                 share_queries=share), (z,))


@pytest.mark.parametrize("formulation", ["paper", "released"])
def test_loss_double_backward(formulation):
    # The reference has gradients of gradients (the fused loss refuses them; tests/test_autograd_compile.py).
    batch, labels, keys, keep = sampled(3, 4, 5, 3, seed=13, min_keys=1, sigma=0.6)
    z = batch["z"].clone().requires_grad_(True)
    assert torch.autograd.gradgradcheck(
        lambda x: ref.contrastive_loss_from_keys(x, labels, keys, keep, formulation=formulation, share_queries=False),
        (z,))


# ------------------------------------------------------------------------------------------------
# the whole pipeline
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("share", [True, False])
def test_pipeline_composes_blocks_and_stats(share):
    batch = blob_batch(12, 14, 10, 8, seed=17)
    batch["valid"] = torch.ones(12, dtype=torch.bool)
    batch["valid"][3] = False
    args = (batch["z"], batch["masks"], batch["cams"], batch["is_novel"])
    loss, stats = ref.query_sharing_contrastive_loss(*args, valid=batch["valid"], seed=99, share_queries=share,
                                                     return_stats=True)
    labels = ref.partition(batch["masks"], batch["cams"], batch["is_novel"], valid=batch["valid"])
    keys, keep = ref.sample_keys(labels, ref.boundary_sqdist(batch["masks"]), batch["is_novel"], seed=99)
    assert not keep[3]
    want = ref.contrastive_loss_from_keys(batch["z"], labels, keys, keep, share_queries=share)
    assert loss.item() == want.item()
    assert stats.kept.dtype == torch.int64 and stats.kept.item() == int(keep.sum())
    per_set = [int(((keys[keep] >> s) & 1).sum()) for s in range(4)]
    assert stats.keys_per_set.tolist() == per_set
    fg = (labels == 1).flatten(1) & keep[:, None]
    mu = torch.einsum("ncp,np->nc", batch["z"].flatten(2), fg.float()) / fg.sum(1, keepdim=True).clamp_min(1)
    if share:
        assert stats.q_pos.shape == (8,)
        has = fg.any(1)
        torch.testing.assert_close(stats.q_pos, mu[has].mean(0))
    else:
        assert stats.q_pos.shape == (12, 8) and (stats.q_neg[~keep] == 0).all()
        torch.testing.assert_close(stats.q_pos, mu)
    assert not stats.q_pos.requires_grad
    assert ref.query_sharing_contrastive_loss(*args, seed=99).dtype == torch.float32


def test_pipeline_module_level_defaults_match_spec():
    batch = blob_batch(6, 10, 10, 4, seed=3)
    args = (batch["z"], batch["masks"], batch["cams"], batch["is_novel"])
    a = ref.query_sharing_contrastive_loss(*args, seed=1)
    b = ref.query_sharing_contrastive_loss(*args, seed=1, delta=0.1, sigma=0.3, tau_easy=0.7, tau_hard=0.3,
                                           hard_sqdist=2, min_keys=5, share_queries=True, formulation="paper")
    assert a.item() == b.item()


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def _bad_cases():
    batch = blob_batch(3, 6, 7, 4, seed=0)
    z, masks, cams, nov = batch["z"], batch["masks"], batch["cams"], batch["is_novel"]
    nov = torch.tensor([True, False, False])
    labels = ref.partition(masks, cams, nov)
    sq = ref.boundary_sqdist(masks)
    keys, keep = ref.sample_keys(labels, sq, nov, seed=0)
    pipe = ref.query_sharing_contrastive_loss
    loss = ref.contrastive_loss_from_keys
    return [
        ("masks", lambda: ref.partition(masks.float() * 2, cams, nov)),
        ("masks", lambda: ref.partition(masks[0], cams, nov)),
        ("masks", lambda: ref.partition(masks.int(), cams, nov)),
        ("masks", lambda: ref.boundary_sqdist(torch.zeros(2, 65, 64, dtype=torch.bool))),
        ("masks", lambda: ref.boundary_sqdist(torch.full((1, 2, 2), math.nan))),
        ("cams", lambda: ref.partition(masks, None, nov)),
        ("cams", lambda: ref.partition(masks, cams[:, :5], nov)),
        ("cams", lambda: ref.partition(masks, (cams * 10).long(), nov)),
        ("is_novel", lambda: ref.partition(masks, cams, nov[:2])),
        ("is_novel", lambda: ref.partition(masks, cams, nov.int())),
        ("valid", lambda: ref.partition(masks, cams, nov, valid=torch.ones(4, dtype=torch.bool))),
        ("delta", lambda: ref.partition(masks, cams, nov, delta=0.6)),
        ("delta", lambda: ref.partition(masks, cams, nov, delta=-0.1)),
        ("delta", lambda: ref.partition(masks, cams, nov, delta=math.nan)),
        ("labels", lambda: ref.sample_keys(labels.long(), sq, nov)),
        ("sqdist", lambda: ref.sample_keys(labels, sq[:, :, :3], nov)),
        ("sqdist", lambda: ref.sample_keys(labels, sq.long(), nov)),
        ("is_novel", lambda: ref.sample_keys(labels, sq, nov[:1])),
        ("sigma", lambda: ref.sample_keys(labels, sq, nov, sigma=0.0)),
        ("sigma", lambda: ref.sample_keys(labels, sq, nov, sigma=1.5)),
        ("min_keys", lambda: ref.sample_keys(labels, sq, nov, min_keys=-1)),
        ("seed", lambda: ref.sample_keys(labels, sq, nov, seed=1.5)),
        ("hard_sqdist", lambda: ref.sample_keys(labels, sq, nov, hard_sqdist=2.5)),
        ("z", lambda: loss(z[:2], labels, keys, keep)),
        ("z", lambda: loss(z[:, :, :5], labels, keys, keep)),
        ("z", lambda: loss(z.long(), labels, keys, keep)),
        ("z", lambda: loss(z[0], labels, keys, keep)),
        ("keys", lambda: loss(z, labels, keys.to(torch.int8), keep)),
        ("keys", lambda: loss(z, labels, keys[:, :5], keep)),
        ("keep", lambda: loss(z, labels, keys, keep[:2])),
        ("labels", lambda: loss(z, labels.float(), keys, keep)),
        ("tau_easy", lambda: loss(z, labels, keys, keep, tau_easy=0.0)),
        ("tau_hard", lambda: loss(z, labels, keys, keep, tau_hard=-1.0)),
        ("formulation", lambda: loss(z, labels, keys, keep, formulation="official")),
        ("z", lambda: pipe(z[:, :, :, :6], masks, cams, nov)),
        ("z", lambda: pipe(z[1:], masks, cams, nov)),
        ("cams", lambda: pipe(z, masks, None, nov)),
        ("sigma", lambda: pipe(z, masks, cams, nov, sigma=-0.3)),
        ("tau_easy", lambda: pipe(z, masks, cams, nov, tau_easy=0)),
        ("formulation", lambda: pipe(z, masks, cams, nov, formulation="Paper")),
        ("min_keys", lambda: pipe(z, masks, cams, nov, min_keys=-2)),
        ("masks", lambda: pipe(z, masks.float() * 0.5, cams, nov)),
    ]


@pytest.mark.parametrize("index", range(len(_bad_cases())))
def test_bad_input_names_the_argument(index):
    name, call = _bad_cases()[index]
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert name in str(info.value)


def test_empty_partitions_are_not_errors():
    masks = torch.zeros(2, 5, 5, dtype=torch.bool)
    z = torch.randn(2, 3, 5, 5, requires_grad=True)
    loss = ref.query_sharing_contrastive_loss(z, masks, None, torch.zeros(2, dtype=torch.bool), seed=0)
    loss.backward()
    assert loss.item() == 0 and (z.grad == 0).all()


# ------------------------------------------------------------------------------------------------
# "released" cosines near the query: the reference is the most exact implementation
# ------------------------------------------------------------------------------------------------

def exact_released_cos(q, x):
    """cos(q, x - q) with x - q, the dot product and the squared norms summed exactly (Fractions), then one
    rounding each: the reference must not lose what q.x - |q|^2 loses to cancellation for x near q."""
    from fractions import Fraction

    qf = [Fraction(v) for v in q]
    d = [Fraction(a) - b for a, b in zip(x, qf)]
    dot = sum(a * b for a, b in zip(qf, d))
    q_norm = math.sqrt(float(sum(a * a for a in qf)))
    d_norm = math.sqrt(float(sum(a * a for a in d)))
    return float(dot) / (max(q_norm, 1e-8) * max(d_norm, 1e-8))


def exact_released_loss(z, keys, keep, q_pos, q_neg, *, tau_easy, tau_hard, share_queries):
    """SPEC step 6, formulation "released", for the given queries, with exact cosines and math.fsum sums."""
    n, c = z.shape[:2]
    feats = z.reshape(n, c, -1).transpose(1, 2).tolist()
    kb = keys.reshape(n, -1).tolist()
    kept = [i for i in range(n) if keep[i]]

    def term(q, pos, neg, t):
        if not pos:
            return 0.0
        s_pos = [exact_released_cos(q, x) for x in pos]
        neg_sum = math.fsum(math.exp(exact_released_cos(q, x) / t) for x in neg)
        return math.fsum(math.log(math.exp(s) + neg_sum) - s / t for s in s_pos) / len(s_pos)

    def four_terms(qs, sets):
        return math.fsum(term(qs[side], sets[p], sets[g], tau_hard if hard else tau_easy)
                         for side, p, g, hard in ref.TERMS)

    def sets_of(i):
        return [[feats[i][j] for j in range(len(kb[i])) if kb[i][j] >> s & 1] for s in range(4)]

    if share_queries:
        pooled = [sum((sets_of(i)[s] for i in kept), []) for s in range(4)]
        return four_terms([q_pos.tolist(), q_neg.tolist()], pooled)
    return math.fsum(four_terms([q_pos[i].tolist(), q_neg[i].tolist()], sets_of(i)) for i in kept) / len(kept)


@pytest.mark.parametrize("scale,noise", [(1.0, 0.0), (1e9, 0.0), (1e3, 1e-9), (1.0, 1e-12)])
@pytest.mark.parametrize("share", [True, False])
def test_released_cosine_is_exact_for_keys_near_the_query(scale, noise, share):
    # Constant z (C = 8; every pixel the same vector, so z - q is the rounding of the mean), and z within
    # noise * scale of a constant: q.(z - q) computed as q.z - |q|^2 cancels, z - q formed first does not.
    batch = blob_batch(5, 9, 10, 8, seed=1, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(8, generator=g, dtype=torch.float64) * scale
    z = v.view(1, 8, 1, 1) + noise * scale * torch.randn(batch["z"].shape, generator=g, dtype=torch.float64)
    labels, sqdist = plan(batch)
    keys, keep = ref.sample_keys(labels, sqdist, batch["is_novel"], seed=0, min_keys=1)
    assert keep.sum() >= 3
    kw = dict(tau_easy=0.3, tau_hard=0.7, share_queries=share)
    loss = ref.contrastive_loss_from_keys(z, labels, keys, keep, formulation="released", **kw)
    # The queries the reference used (the oracle takes them as given: z - q is defined by them).
    _, queries = ref._loss_and_queries(z, labels, keys, keep, 0.3, 0.7, share, "released")
    stats = ref.loss_stats(keys, keep, queries, share)
    want = exact_released_loss(z, keys, keep, stats.q_pos, stats.q_neg, **kw)
    assert loss.dtype == torch.float64
    assert abs(loss.item() - want) <= 1e-13 * abs(want), (loss.item(), want)


def test_torch_func_grad_of_any_order_matches_autograd():
    # torch.func's transforms wrap every tensor made inside them (no storage for the sampler's numpy hash)
    b = blob_batch(4, 12, 12, 6, seed=1, dtype=torch.float64)

    def loss(z):
        return ref.query_sharing_contrastive_loss(z, b["masks"], b["cams"], b["is_novel"], seed=3, min_keys=1)

    z = b["z"].clone().requires_grad_(True)
    (dz,) = torch.autograd.grad(loss(z), z, create_graph=True)
    (ddz,) = torch.autograd.grad(dz.pow(2).sum(), z)
    torch.testing.assert_close(torch.func.grad(loss)(b["z"]), dz.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(torch.func.grad(lambda z: torch.func.grad(loss)(z).pow(2).sum())(b["z"]), ddz,
                               rtol=1e-10, atol=1e-14)
