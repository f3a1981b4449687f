"""Query sharing across processes (process_group=...): two gloo processes on the CPU, float64, against one
process holding the whole batch (all ranks' ROIs concatenated in rank order).

One spawn runs every case on both ranks (a spawn costs about a torch import), saving what each rank got;
the tests below compare that with the single-process loss computed here.
"""
import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

import contrastmask_ops as cm
from blobs import blob_batch
from contrastmask_ops import functional
from contrastmask_ops._seed import draw_seed
from contrastmask_ops import reference as ref

WORLD = 2
N, C, H, W = 11, 6, 12, 12
SEED = 2**63 + 17  # any 64-bit seed; the same on every rank
# rows of rank 0 (rank 1 holds the rest) and the rows left out with valid=False (a rank whose ROIs are all
# dropped: keep is all false there)
SPLITS = {
    "uneven": (4, ()),
    "rank0_empty": (0, ()),
    "rank1_empty": (N, ()),
    "rank1_all_dropped": (7, range(7, N)),
}
IMPLS = ["reference"] + (["kernels"] if cm.build_info()["cpu"] else [])
# The CUDA kernels too, emulated on the CPU under each fiber order (tests/emulator/cuda_emu.py; marked cuda_emu).
EMU_IMPLS = ["emu-fwd", "emu-rev", "emu-rand"] if cm.build_info()["cpu"] else []
FORMULATIONS = ["paper", "released"]
CASES = [(split, impl, formulation, share_queries) for split in SPLITS for impl in IMPLS + EMU_IMPLS
         for formulation in FORMULATIONS for share_queries in (True, False)]


def case_param(case):
    marks = [pytest.mark.cuda_emu] if case[1].startswith("emu-") else []
    return pytest.param(*case, marks=marks, id="-".join(map(str, case)))


class _emulated:
    """Within: the public API runs the emulated CUDA kernels under a fiber order (impl "emu-<order>")."""

    def __init__(self, impl):
        self.order = impl.removeprefix("emu-") if impl.startswith("emu-") else None

    def __enter__(self):
        if self.order is not None:
            import cuda_emu

            self.saved = functional._ops
            functional._ops = _emu_ops()
            cuda_emu.set_order(self.order, 7)
        return self

    def __exit__(self, *exc):
        if self.order is not None:
            functional._ops = self.saved


_EMU_OPS = []


def _emu_ops():
    """The emulation's namespace, recording its plans (one object per process)."""
    if not _EMU_OPS:
        import cuda_emu

        _EMU_OPS.append(_RecordingOps(cuda_emu.load()))
    return _EMU_OPS[0]


def whole_batch():
    b = blob_batch(N, H, W, C, seed=4, dtype=torch.float64)
    return b["z"], b["masks"], b["cams"], b["is_novel"]


def rank_batch(rank):
    """(z, masks, cams, novel): this rank's rows of whole_batch() in the "uneven" split."""
    rows = rank_rows("uneven", rank)
    return tuple(t[rows] for t in whole_batch())


def valid_rows(split):
    valid = torch.ones(N, dtype=torch.bool)
    valid[list(SPLITS[split][1])] = False
    return valid


def rank_rows(split, rank):
    cut = SPLITS[split][0]
    return slice(0, cut) if rank == 0 else slice(cut, N)


def loss_kwargs(formulation, share_queries):
    temps = dict(tau_easy=0.3, tau_hard=0.7) if formulation == "released" else {}
    return dict(formulation=formulation, share_queries=share_queries, min_keys=2, **temps)


def single_process(impl, split, formulation, share_queries):
    """(loss, dz, keys, keep) of the whole batch in one process."""
    z, masks, cams, novel = whole_batch()
    valid = valid_rows(split)
    z = z.clone().requires_grad_(True)
    api = ref if impl == "reference" else cm
    with _emulated(impl):
        loss = api.query_sharing_contrastive_loss(z, masks, cams, novel, valid=valid, seed=SEED,
                                                  **loss_kwargs(formulation, share_queries))
        (dz,) = torch.autograd.grad(loss, z)
    labels = ref.partition(masks, cams, novel, valid=valid)
    keys, keep = ref.sample_keys(labels, ref.boundary_sqdist(masks), novel, min_keys=2, seed=SEED)
    return loss.detach(), dz, keys, keep


# ---------------------------------------------------------------- what each rank runs

class _RecordingOps:
    """torch.ops.contrastmask, keeping what roi_plan returned: the keys the global loss used."""

    def __init__(self, ops):
        self.ops, self.plans = ops, []

    def __getattr__(self, name):
        return getattr(self.ops, name)

    @property
    def roi_plan(self):
        return _RecordingOverloads(self.ops.roi_plan, self.plans)


class _RecordingOverloads:
    """An op's overloads (functional calls roi_plan.int_seed or .default), each appending what it returns."""

    def __init__(self, packet, plans):
        self.packet, self.plans = packet, plans

    def __getattr__(self, overload):
        op = getattr(self.packet, overload)

        def recording(*args):
            out = op(*args)
            self.plans.append(out)
            return out

        return recording


def _record_reference_keys():
    """Makes the reference pipeline keep the (keys, keep) it sampled; returns the list they go to."""
    plans, sample = [], ref._sample_keys

    def recording(*args):
        out = sample(*args)
        plans.append(out)
        return out

    ref._sample_keys = recording
    return plans


def _rank_case(rank, split, impl, formulation, share_queries):
    z, masks, cams, novel = whole_batch()
    rows = rank_rows(split, rank)
    z = z[rows].clone().requires_grad_(True)
    api = ref if impl == "reference" else cm
    with _emulated(impl):
        loss = api.query_sharing_contrastive_loss(z, masks[rows], cams[rows], novel[rows],
                                                  valid=valid_rows(split)[rows], seed=SEED,
                                                  process_group=dist.group.WORLD, **loss_kwargs(formulation, share_queries))
        loss.backward()
    return loss.detach(), z.grad


def _rank_ddp_projector(rank, loss_group):
    """Parameter gradients of a 1x1-conv projector under DDP with the global loss times the world size."""
    feats, masks, cams, novel = projector_batch()
    rows = rank_rows("uneven", rank)
    projector = DistributedDataParallel(make_projector())
    criterion = cm.QuerySharingContrastiveLoss(process_group=loss_group)
    loss = criterion(projector(feats[rows]), masks[rows], cams[rows], novel[rows], seed=SEED)
    (loss * dist.get_world_size(loss_group)).backward()  # DDP averages the ranks' gradients
    return {name: p.grad.clone() for name, p in projector.module.named_parameters()}


def _raised(call, *errors, with_type=False):
    """The message of the error of one of these types that call() raises ("Type: message" with_type), or
    "no error"."""
    try:
        call()
    except errors as e:
        return f"{type(e).__name__}: {e}" if with_type else str(e)
    return "no error"


def _rank_errors(rank):
    """The error each rank raises when the ranks disagree (every rank raises, none waits forever)."""
    z, masks, cams, novel = rank_batch(rank)

    def call(z, **kw):
        return cm.query_sharing_contrastive_loss(z, masks, cams, novel, process_group=dist.group.WORLD, **kw)

    calls = {
        "seed": lambda: call(z, seed=rank),
        "channels": lambda: call(z[:, :C - rank], seed=SEED),
        "share_queries": lambda: call(z, seed=SEED, share_queries=rank == 0),
    }
    return {name: _raised(run, ValueError) for name, run in calls.items()}


def _public_apis():
    """(impl, the module whose query_sharing_contrastive_loss it runs) for each of IMPLS."""
    return [(impl, ref if impl == "reference" else cm) for impl in IMPLS]


def _per_impl(rank, results_of):
    """{(impl, name): value} over IMPLS, from results_of(impl, api, z, masks, cams, novel) -> {name: value} on
    this rank's rows."""
    batch = rank_batch(rank)
    return {(impl, name): value for impl, api in _public_apis()
            for name, value in results_of(impl, api, *batch).items()}


def _rank_errors_of_one_rank(rank):
    """Errors that only rank 1 makes (a bad value, a bad argument): every rank must raise, then both go on."""

    def errors(impl, api, z, masks, cams, novel):
        bad_masks = masks.double()  # (bool masks cannot hold a 3)
        if rank == 1:
            bad_masks[0, 0, 0] = 3
        bad_z = z[:, :, 0] if rank == 1 else z  # 3-D: refused by rank 1's argument checks
        out = {name: _raised(lambda: api.query_sharing_contrastive_loss(
                   zz, mm, cams, novel, seed=SEED, process_group=dist.group.WORLD), TypeError, ValueError,
                   with_type=True)
               for name, (zz, mm) in {"value": (z, bad_masks), "argument": (bad_z, masks)}.items()}
        # and the ranks are still in step: a good call works on both
        out["after"] = api.query_sharing_contrastive_loss(z, masks, cams, novel, seed=SEED,
                                                          process_group=dist.group.WORLD)
        return out

    return _per_impl(rank, errors)


def _rank_module_copy(rank):
    """A module holding a process group: a deep copy shares the group and gives the same loss; pickling refuses."""
    import copy
    import pickle

    z, masks, cams, novel = rank_batch(rank)
    criterion = cm.QuerySharingContrastiveLoss(process_group=dist.group.WORLD, min_keys=2)
    clone = copy.deepcopy(criterion)
    return {"same_group": clone.process_group is criterion.process_group,
            "refused": _raised(lambda: pickle.dumps(criterion), TypeError),
            "loss": criterion(z, masks, cams, novel, seed=SEED),
            "clone_loss": clone(z, masks, cams, novel, seed=SEED),
            "plain_pickles": len(pickle.dumps(cm.QuerySharingContrastiveLoss(min_keys=2))) > 0}


def _rank_edges(rank):
    """Double backward, torch.compile and meta tensors through process_group."""

    def edges(impl, api, z, masks, cams, novel):
        zz = z.clone().requires_grad_(True)
        loss = api.query_sharing_contrastive_loss(zz, masks, cams, novel, seed=SEED, process_group=dist.group.WORLD)
        (dz,) = torch.autograd.grad(loss, zz, create_graph=True)
        out = {"double_backward": _raised(lambda: dz.pow(2).sum().backward(), RuntimeError)}
        if impl == "kernels":  # the reference's sampler hashes on the host: it takes no meta tensors at all
            meta = [t.to("meta") for t in (z, masks, cams, novel)]
            got = api.query_sharing_contrastive_loss(*meta, seed=SEED, process_group=dist.group.WORLD)
            out["meta"] = (got.device.type, tuple(got.shape))
        return out

    out = _per_impl(rank, edges)
    z, masks, cams, novel = rank_batch(rank)

    def step(z, masks, cams, novel):
        return cm.query_sharing_contrastive_loss(z, masks, cams, novel, seed=SEED, process_group=dist.group.WORLD)

    torch._dynamo.reset()
    out["compiled"] = torch.compile(step, backend="eager")(z, masks, cams, novel)
    out["eager"] = step(z, masks, cams, novel)
    torch._dynamo.reset()  # else the first compile's cached code would serve the fullgraph one
    fullgraph = torch.compile(step, backend="eager", fullgraph=True)
    out["fullgraph"] = _raised(lambda: fullgraph(z, masks, cams, novel), Exception, with_type=True)  # Unsupported
    return out


NO_SYNC_STEPS = ((4, 5), (6, 6), (0, 7), (9, 8))  # (rank 0's rows, the step's seed offset) of each step


class _Counting:
    """Counts host reads of tensor values (tolist, item, int/float/bool of a tensor) and all_gathers."""

    READS = ("tolist", "item", "__int__", "__index__", "__float__", "__bool__")

    def __init__(self):
        self.reads = self.gathers = 0

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in self.READS}
        self.saved_gather = dist.all_gather
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, self._counting(method))

        def gather(*args, **kwargs):
            self.gathers += 1
            return self.saved_gather(*args, **kwargs)

        dist.all_gather = gather
        return self

    def _counting(self, method):
        def counted(*args, **kwargs):
            self.reads += 1
            return method(*args, **kwargs)
        return counted

    def __exit__(self, *exc):
        for name, method in self.saved.items():
            setattr(torch.Tensor, name, method)
        dist.all_gather = self.saved_gather


def _rank_no_sync(rank):
    """A tensor seed and check_inputs=False: host reads and all_gathers of each step (the ROI split and the seed
    change every step), and each step's loss and gradient."""
    z, masks, cams, novel = whole_batch()
    seed = torch.tensor(0)
    out = []
    for cut, step in NO_SYNC_STEPS:
        rows = slice(0, cut) if rank == 0 else slice(cut, N)
        zz = z[rows].clone().requires_grad_(True)
        seed.fill_(SEED - 2**64 + step)
        with _Counting() as counting:
            loss = cm.query_sharing_contrastive_loss(zz, masks[rows], cams[rows], novel[rows], seed=seed,
                                                     check_inputs=False, process_group=dist.group.WORLD, min_keys=2)
            loss.backward()
        out.append(dict(reads=counting.reads, gathers=counting.gathers, loss=loss.detach(), dz=zz.grad))
    return out


FLOAT32_CASES = [(impl, formulation, share_queries) for impl in IMPLS[1:] + EMU_IMPLS[:1]
                 for formulation in FORMULATIONS for share_queries in (True, False)]


def _float32_loss(impl, formulation, share_queries, rows=slice(0, N), group=None):
    z, masks, cams, novel = whole_batch()
    z = z[rows].float().clone().requires_grad_(True)
    with _emulated(impl):
        loss = cm.query_sharing_contrastive_loss(z, masks[rows], cams[rows], novel[rows], seed=SEED, process_group=group,
                                                 **loss_kwargs(formulation, share_queries))
        (dz,) = torch.autograd.grad(loss, z)
    return loss.detach(), dz


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=120))
    try:
        if "kernels" in IMPLS:
            functional._ops = _RecordingOps(functional._ops)
        ref_plans = _record_reference_keys()
        out = {}
        for split, impl, formulation, share_queries in CASES:
            plans = ref_plans if impl == "reference" else _emu_ops().plans if impl.startswith("emu-") \
                else functional._ops.plans
            loss, dz = _rank_case(rank, split, impl, formulation, share_queries)
            keys, keep = plans[-1][-2:]
            out[(split, impl, formulation, share_queries)] = dict(loss=loss, dz=dz, keys=keys, keep=keep)
        out["ddp"] = _rank_ddp_projector(rank, dist.new_group())  # the loss's own group, beside DDP's
        torch.manual_seed(100 + rank)  # seed=None: every rank draws, the first rank's draw is used
        batch = rank_batch(rank)
        out["seed_none"] = cm.query_sharing_contrastive_loss(*batch, process_group=dist.group.WORLD)
        out["seed_tensor"] = cm.query_sharing_contrastive_loss(*batch, seed=torch.tensor(SEED - 2**64),  # its 64 bits
                                                               process_group=dist.group.WORLD)
        out["no_sync"] = _rank_no_sync(rank)
        out["float32"] = {case: _float32_loss(*case, rows=rank_rows("uneven", rank), group=dist.group.WORLD)
                          for case in FLOAT32_CASES}
        out["errors"] = _rank_errors(rank)
        out["one_rank_errors"] = _rank_errors_of_one_rank(rank)
        out["module_copy"] = _rank_module_copy(rank)
        out["edges"] = _rank_edges(rank)
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def projector_batch():
    _, masks, cams, novel = whole_batch()
    feats = torch.randn(N, 5, H, W, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    return feats, masks, cams, novel


def make_projector():
    torch.manual_seed(3)
    return torch.nn.Conv2d(5, C, 1).double()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("global_queries")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


# ---------------------------------------------------------------- tests

def _assert_close(got, want, rel, scale):
    """max |got - want| <= rel * scale (scale: the largest entry of the whole gradient)."""
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= rel * scale, (err, scale)


@pytest.mark.parametrize("split,impl,formulation,share_queries", [case_param(case) for case in CASES])
def test_each_rank_gets_the_whole_batch_loss(ranks, split, impl, formulation, share_queries):
    """The loss of all ranks' ROIs on every rank, and each rank its rows of that loss's gradient."""
    loss, dz, keys, keep = single_process(impl, split, formulation, share_queries)
    assert keep.any()
    for rank, results in enumerate(ranks):
        got = results[(split, impl, formulation, share_queries)]
        rows = rank_rows(split, rank)
        assert torch.equal(got["keys"], keys[rows]) and torch.equal(got["keep"], keep[rows])
        assert abs(got["loss"].item() - loss.item()) <= 1e-12 * abs(loss.item()), (got["loss"].item(), loss.item())
        assert got["dz"].shape == dz[rows].shape
        _assert_close(got["dz"], dz[rows], 1e-10, dz.abs().max().item())
    # the same bits on every rank
    assert torch.equal(ranks[0][(split, impl, formulation, share_queries)]["loss"],
                       ranks[1][(split, impl, formulation, share_queries)]["loss"])
    if split == "rank1_all_dropped":
        assert not ranks[1][(split, impl, formulation, share_queries)]["keep"].any()


@pytest.mark.parametrize("impl,formulation,share_queries",
                         [pytest.param(*case, marks=[pytest.mark.cuda_emu] if case[0].startswith("emu-") else [])
                          for case in FLOAT32_CASES])
def test_float32_global_loss_is_within_tolerance(ranks, impl, formulation, share_queries):
    """float32 over a process group is within the local kernels' float32 tolerances."""
    loss, dz = _float32_loss(impl, formulation, share_queries)
    for rank, results in enumerate(ranks):
        got_loss, got_dz = results["float32"][(impl, formulation, share_queries)]
        assert got_loss.dtype == torch.float32
        torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-7)
        _assert_close(got_dz, dz[rank_rows("uneven", rank)], 1e-4, dz.abs().max().item())
    assert torch.equal(ranks[0]["float32"][(impl, formulation, share_queries)][0],
                       ranks[1]["float32"][(impl, formulation, share_queries)][0])


def test_scaled_ddp_trains_as_one_process(ranks):
    """DDP with the loss scaled by the world size gives the single-process gradient of the projector."""
    feats, masks, cams, novel = projector_batch()
    projector = make_projector()
    loss = cm.query_sharing_contrastive_loss(projector(feats), masks, cams, novel, seed=SEED)
    loss.backward()
    for results in ranks:
        for name, p in projector.named_parameters():
            _assert_close(results["ddp"][name], p.grad, 1e-10, p.grad.abs().max().item())


def _assert_each_rank_got_the_loss(ranks, got_of, seed):
    """got_of(a rank's results) is, on every rank, the single-process loss of the whole batch with this seed."""
    want = cm.query_sharing_contrastive_loss(*whole_batch(), seed=seed)
    for results in ranks:
        assert abs(got_of(results).item() - want.item()) <= 1e-12 * want.item()


def test_seed_none_uses_the_first_ranks_draw(ranks):
    torch.manual_seed(100)
    _assert_each_rank_got_the_loss(ranks, lambda results: results["seed_none"], draw_seed())


def test_a_tensor_seed_is_joined_like_the_integer(ranks):
    _assert_each_rank_got_the_loss(ranks, lambda results: results["seed_tensor"], SEED)


@pytest.mark.skipif("kernels" not in IMPLS, reason="the compiled extension is not built")
def test_unchecked_tensor_seed_steps_read_nothing(ranks):
    """A tensor seed with check_inputs=False reads nothing on the host after the first step."""
    z, masks, cams, novel = whole_batch()
    for i, (cut, step) in enumerate(NO_SYNC_STEPS):
        zz = z.clone().requires_grad_(True)
        want = cm.query_sharing_contrastive_loss(zz, masks, cams, novel, seed=SEED + step, min_keys=2)
        (dz,) = torch.autograd.grad(want, zz)
        for rank, results in enumerate(ranks):
            got = results["no_sync"][i]
            # the first step joins the configuration (one host read of the gathered rows); later ones read nothing
            assert got["reads"] == (1 if i == 0 else 0), (i, got["reads"])
            # join, query sums, log-sum-exp pairs, positive sums; backward: term sums' gradients, dL/dq sums
            assert got["gathers"] == 6, (i, got["gathers"])
            assert abs(got["loss"].item() - want.item()) <= 1e-12 * abs(want.item())
            rows = slice(0, cut) if rank == 0 else slice(cut, N)
            _assert_close(got["dz"], dz[rows], 1e-10, dz.abs().max().item())


def test_ranks_that_disagree_all_raise(ranks):
    for results in ranks:
        errors = results["errors"]
        assert errors["seed"].startswith("seed: every rank"), errors["seed"]
        assert errors["channels"].startswith("process_group: rank 1 has z of shape (N, 5"), errors["channels"]
        assert errors["share_queries"].startswith("process_group: rank 1 passed other"), errors["share_queries"]


@pytest.mark.parametrize("impl", IMPLS)
def test_one_rank_error_raises_on_every_rank(ranks, impl):
    """An error of one rank is raised on every rank, and the ranks stay in step for the next call."""
    mine, other = ranks[1]["one_rank_errors"], ranks[0]["one_rank_errors"]
    assert mine[(impl, "value")].startswith("ValueError: masks"), mine[(impl, "value")]
    assert other[(impl, "value")] == "ValueError: process_group: rank 1 raised " + mine[(impl, "value")] + \
        " (every rank raises with it)"
    assert not mine[(impl, "argument")].startswith("ValueError: process_group"), mine[(impl, "argument")]
    assert other[(impl, "argument")].startswith("ValueError: process_group: rank 1 raised "), other[(impl, "argument")]
    _assert_each_rank_got_the_loss(ranks, lambda results: results["one_rank_errors"][(impl, "after")], SEED)


@pytest.mark.parametrize("impl", IMPLS)
def test_double_backward_through_a_group_raises(ranks, impl):
    """Differentiating the global loss's gradient raises instead of being wrong."""
    for results in ranks:
        assert "once_differentiable" in results["edges"][(impl, "double_backward")]


@pytest.mark.skipif("kernels" not in IMPLS, reason="the compiled extension is not built")
def test_meta_tensors_give_the_global_loss_shape(ranks):
    for results in ranks:
        assert results["edges"][("kernels", "meta")] == ("meta", ())


def test_compile_runs_the_global_loss_eagerly(ranks):
    """torch.compile runs it outside the graph; fullgraph=True refuses it."""
    for results in ranks:
        edges = results["edges"]
        assert torch.equal(edges["compiled"], edges["eager"])
        assert edges["fullgraph"].startswith("Unsupported") and "compile without fullgraph=True" in edges["fullgraph"], \
            edges["fullgraph"][:500]


def test_grouped_module_deepcopies_not_pickles(ranks):
    """A module holding a process group deep-copies with it and refuses pickling with a clear error."""
    for results in ranks:
        got = results["module_copy"]
        assert got["same_group"] and got["plain_pickles"]
        assert torch.equal(got["loss"], got["clone_loss"])
        assert got["refused"].startswith("QuerySharingContrastiveLoss: a module holding a process_group cannot be "
                                         "pickled"), got["refused"]


def test_process_group_needs_torch_distributed():
    with pytest.raises(TypeError, match="^process_group must be"):
        cm.QuerySharingContrastiveLoss(process_group=object())
