"""Autograd, torch.library.opcheck and torch.compile through the compiled operators (opcheck and
torch.compile on every device, see devices.py)."""
import pytest
import torch

import contrastmask_ops as cm
import devices
from blobs import blob_batch

pytestmark = pytest.mark.skipif(not cm.build_info()["cpu"], reason="CPU kernels not built")
ops = torch.ops.contrastmask


def _tiny(seed=0, n=3, c=4, dtype=torch.float64):
    b = blob_batch(n, 9, 11, c, seed=seed, dtype=dtype)
    labels, keys, keep = ops.roi_plan(b["masks"], b["cams"], b["is_novel"], None, 0.1, 0.5, 2, 1, seed)
    assert keep.any(), "the tiny batch must keep some ROI"
    return b, labels, keys, keep


@pytest.mark.parametrize("formulation", ["paper", "released"])
@pytest.mark.parametrize("share_queries", [True, False])
def test_gradcheck_loss_from_keys(formulation, share_queries):
    b, labels, keys, keep = _tiny()
    z = b["z"].clone().requires_grad_(True)
    fn = lambda z: cm.contrastive_loss_from_keys(z, labels, keys, keep, share_queries=share_queries,
                                                 formulation=formulation)
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("formulation", ["paper", "released"])
@pytest.mark.parametrize("share_queries", [True, False])
def test_gradcheck_fused(formulation, share_queries):
    b, *_ = _tiny(seed=1)
    z = b["z"].clone().requires_grad_(True)
    fn = lambda z: cm.query_sharing_contrastive_loss(z, b["masks"], b["cams"], b["is_novel"], sigma=0.5, min_keys=1,
                                                     share_queries=share_queries, formulation=formulation, seed=4)
    assert torch.autograd.gradcheck(fn, (z,), eps=1e-6, atol=1e-6, rtol=1e-4)


def _opcheck_cases(device):
    b, labels, keys, keep = _tiny(dtype=torch.float32)
    b, labels, keys, keep = device.batch(b), device.to(labels), device.to(keys), device.to(keep)
    ops = device.ops
    sqdist = ops.boundary_sqdist(b["masks"])
    z = b["z"].clone().requires_grad_(True)
    loss, queries, pixstats, termstats = ops.contrastive_loss(z, labels, keys, keep, 0.7, 0.3, True, "paper")
    grad = device.to(torch.ones((), dtype=z.dtype))
    p = (0.7, 0.3, True, "paper")
    args = (z.detach(), labels, keys, keep)
    sums, counts = ops.contrastive_loss_query_sums(*args, *p)
    queries_, pixstats_, lse = ops.contrastive_loss_cosines(*args, sums, counts, *p)
    termstats_, pos_sums = ops.contrastive_loss_terms(*args, pixstats_, lse, *p)
    _, termstats_ = ops.contrastive_loss_finish(*args, termstats_, pos_sums, counts, *p)
    stage_grad = grad.to(termstats_.dtype)
    coef, dq, beta = ops.contrastive_loss_query_grads(stage_grad, None, *args, queries_, pixstats_, termstats_,
                                                      counts, *p)
    return {
        "partition": (b["masks"], b["cams"], b["is_novel"], None, 0.1, False),
        "boundary_sqdist": (b["masks"], False),
        "sample_keys": (labels, sqdist, b["is_novel"], 0.3, 2, 1, device.to(torch.tensor(5))),
        "roi_plan": (b["masks"], b["cams"], b["is_novel"], None, 0.1, 0.3, 2, 1, torch.tensor(5)),
        "contrastive_loss": (z, labels, keys, keep, 0.7, 0.3, True, "paper"),
        "contrastive_loss_backward": (grad, z.detach(), labels, keys, keep, queries.detach(), pixstats.detach(),
                                      termstats.detach(), 0.7, 0.3, True, "paper"),
        # The loss's stages, which the global loss runs with collectives in between.
        "contrastive_loss_query_sums": (*args, *p),
        "contrastive_loss_cosines": (*args, sums, counts, *p),
        "contrastive_loss_terms": (*args, pixstats_, lse, *p),
        "contrastive_loss_finish": (*args, termstats_, pos_sums, counts, *p),
        "contrastive_loss_query_grads": (stage_grad, torch.ones_like(stage_grad), *args, queries_, pixstats_,
                                         termstats_, counts, *p),
        "contrastive_loss_dz": (*args, queries_, coef, dq, beta, counts, *p),
    }


OPCHECKED = ["partition", "boundary_sqdist", "sample_keys", "roi_plan", "contrastive_loss", "contrastive_loss_backward",
             *(f"contrastive_loss_{stage}" for stage in ("query_sums", "cosines", "terms", "finish", "query_grads",
                                                         "dz"))]


@pytest.mark.parametrize("name", OPCHECKED)
def test_opcheck(device, name):
    torch.library.opcheck(getattr(device.ops, name).default, _opcheck_cases(device)[name])


def test_torch_compile_fullgraph_matches_eager(device):
    b = device.batch(blob_batch(8, 28, 28, 16, seed=3))

    def step(z, masks, cams, is_novel):
        return cm.query_sharing_contrastive_loss(z, masks, cams, is_novel, seed=123) * 2.0

    torch._dynamo.reset()  # a fresh compile on each device (the public API routes to its kernels)
    compiled = torch.compile(step, fullgraph=True)
    (eager,), eager_dz = _step_and_dz(step, b)
    (got,), got_dz = _step_and_dz(compiled, b)
    assert torch.equal(eager, got)
    assert torch.equal(eager_dz, got_dz)


def _step_and_dz(step, b, *seed):
    """step(z, masks, cams, is_novel[, seed]) on a fresh leaf copy of b["z"], then backward from its loss:
    (its outputs as a tuple, the loss first; dz)."""
    z = b["z"].clone().requires_grad_(True)
    out = step(z, b["masks"], b["cams"], b["is_novel"], *seed)
    out = out if isinstance(out, tuple) else (out,)
    out[0].backward()
    return out, z.grad


def _counted_compile(step, **compile_kw):
    """torch.compile(step, fullgraph=True) after a dynamo reset, and the counter of the graphs it compiles.
    Backend aot_eager: dynamo and AOTAutograd with the fake kernels, without inductor's code generation
    (minutes here)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    return torch.compile(step, backend=counter, fullgraph=True, **compile_kw), counter


def test_tensor_seed_per_step_compiles_once(device):
    """A seed that changes every step is data, not a constant of the graph: 20 seeds, one compilation
    (fullgraph), each call equal to eager. An integer seed would recompile at every new value."""
    b = device.batch(blob_batch(6, 14, 14, 8, seed=3))

    def step(z, masks, cams, is_novel, seed):
        return cm.query_sharing_contrastive_loss(z, masks, cams, is_novel, min_keys=1, seed=seed, return_stats=True)

    compiled, counter = _counted_compile(step)
    losses = set()
    for i in range(20):
        seed = device.to(torch.tensor(1000 + 7919 * i))
        (want, want_stats), want_dz = _step_and_dz(step, b, seed)
        (got, got_stats), got_dz = _step_and_dz(compiled, b, seed)
        assert torch.equal(got, want) and torch.equal(got_stats.q_pos, want_stats.q_pos), i
        assert torch.equal(got_dz, want_dz), i
        losses.add(want.item())
    assert counter.frame_count == 1
    assert len(losses) == 20  # each seed samples other keys


@pytest.mark.parametrize("dynamic,compilations", [(True, 1), (None, 2)])
def test_integer_seed_per_step_stays_symbolic(device, dynamic, compilations):
    """seed=step, as users write it: the ops take the integer seed as a SymInt, so dynamo keeps it symbolic
    (one compilation with dynamic=True; with the default, the first call specialises and the second makes
    it dynamic), each call equal to eager."""
    b = device.batch(blob_batch(6, 14, 14, 8, seed=3))

    def step(z, masks, cams, is_novel, seed):
        return cm.query_sharing_contrastive_loss(z, masks, cams, is_novel, min_keys=1, seed=seed)

    compiled, counter = _counted_compile(step, dynamic=dynamic)
    losses = set()
    for seed in [*range(18), 2**63 - 1, -5]:
        (want,), want_dz = _step_and_dz(step, b, seed)
        (got,), got_dz = _step_and_dz(compiled, b, seed)
        assert torch.equal(got, want), seed
        assert torch.equal(got_dz, want_dz), seed
        losses.add(want.item())
    # (dynamo also hands the backend an empty graph on the first call; only graphs that run the ops count)
    assert sum("contrastmask" in g.code for g in counter.graphs) == compilations
    assert len(losses) == 20


def test_seed_none_under_compile_asks_for_a_seed():
    """seed=None would draw on the host: under torch.compile the user gets one line that says to pass a seed
    (dynamo adds where in their code), not dynamo's report of a graph break."""
    b = blob_batch(3, 9, 11, 4, seed=1)

    def step(z, masks, cams, is_novel):
        return cm.query_sharing_contrastive_loss(z, masks, cams, is_novel)

    torch._dynamo.reset()
    with pytest.raises(RuntimeError) as info:
        torch.compile(step, backend="eager", fullgraph=True)(b["z"], b["masks"], b["cams"], b["is_novel"])
    first_line = str(info.value).splitlines()[0]
    assert first_line.startswith("seed: pass a seed under torch.compile"), first_line
    step(b["z"], b["masks"], b["cams"], b["is_novel"])  # eager still draws one


def test_stats_are_detached():
    b = blob_batch(8, 28, 28, 16, seed=3)
    z = b["z"].clone().requires_grad_(True)
    loss, stats = cm.query_sharing_contrastive_loss(z, b["masks"], b["cams"], b["is_novel"], seed=1,
                                                    return_stats=True)
    assert loss.requires_grad and not stats.q_pos.requires_grad


# ------------------------------------------------------------------------------------------------
# Double backward: differentiating the fused loss's gradient raises instead of dropping a term
# ------------------------------------------------------------------------------------------------

def _fused_and_from_keys(b, labels, keys, keep):
    return [
        lambda z: cm.query_sharing_contrastive_loss(z, b["masks"], b["cams"], b["is_novel"], sigma=0.5, min_keys=1,
                                                    seed=4),
        lambda z: cm.contrastive_loss_from_keys(z, labels, keys, keep, formulation="released", share_queries=False),
    ]


def test_double_backward_raises_a_clear_error():
    b, labels, keys, keep = _tiny()
    for loss_fn in _fused_and_from_keys(b, labels, keys, keep):
        z = b["z"].clone().requires_grad_(True)
        (g_plain,) = torch.autograd.grad(loss_fn(z), z)
        # A gradient penalty: create_graph=True alone is fine and gives the same first-order gradient ...
        total = loss_fn(z) + (z ** 2).sum()
        (g,) = torch.autograd.grad(total, z, create_graph=True)
        torch.testing.assert_close(g, g_plain + 2 * z, rtol=1e-12, atol=1e-12)
        # ... but differentiating that gradient would miss the loss's second-order term: it raises.
        with pytest.raises(RuntimeError, match="no double backward"):
            torch.autograd.grad(g.square().sum(), z)
        (g,) = torch.autograd.grad(loss_fn(z), z, create_graph=True)
        with pytest.raises(RuntimeError, match="no double backward"):
            g.sum().backward()


# ------------------------------------------------------------------------------------------------
# Fake kernels check devices, shapes and dtypes like the real ones
# ------------------------------------------------------------------------------------------------

def _meta(t):
    return None if t is None else t.to("meta")


def _fake_cases():
    b, labels, keys, keep = _tiny(dtype=torch.float32)
    masks, cams, novel, z = b["masks"], b["cams"], b["is_novel"], b["z"]
    sqdist = ops.boundary_sqdist(masks)
    loss, queries, pixstats, termstats = ops.contrastive_loss(z, labels, keys, keep, 0.7, 0.3, True, "paper")
    grad = torch.ones(())
    m = _meta
    return [
        # (argument named, call): mixed devices, wrong shapes, wrong dtypes, bad parameters
        ("cams", lambda: ops.partition(masks, m(cams), novel, None, 0.1)),
        ("is_novel", lambda: ops.partition(m(masks), m(cams), novel, None, 0.1)),
        ("cams", lambda: ops.roi_plan(m(masks), m(cams)[:, :5], m(novel), None, 0.1, 0.3, 2, 1, 0)),
        ("valid", lambda: ops.roi_plan(m(masks), m(cams), m(novel), m(novel)[:2], 0.1, 0.3, 2, 1, 0)),
        ("sigma", lambda: ops.roi_plan(m(masks), m(cams), m(novel), None, 0.1, 1.5, 2, 1, 0)),
        ("masks", lambda: ops.boundary_sqdist(m(masks)[0])),
        ("sqdist", lambda: ops.sample_keys(m(labels), sqdist, m(novel), 0.3, 2, 1, 0)),
        ("sqdist", lambda: ops.sample_keys(m(labels), m(sqdist).long(), m(novel), 0.3, 2, 1, 0)),
        ("min_keys", lambda: ops.sample_keys(m(labels), m(sqdist), m(novel), 0.3, 2, -1, 0)),
        ("roi_offset", lambda: ops.sample_keys(m(labels), m(sqdist), m(novel), 0.3, 2, 1, 0, -1)),
        ("roi_offset", lambda: ops.roi_plan(m(masks), m(cams), m(novel), None, 0.1, 0.3, 2, 1, 0, -3)),
        ("seed", lambda: ops.roi_plan(m(masks), m(cams), m(novel), None, 0.1, 0.3, 2, 1, m(torch.tensor([1])))),
        ("seed", lambda: ops.sample_keys(m(labels), m(sqdist), m(novel), 0.3, 2, 1, torch.tensor(1.0))),
        ("z", lambda: ops.contrastive_loss(z, m(labels), m(keys), m(keep), 0.7, 0.3, True, "paper")),
        ("z", lambda: ops.contrastive_loss(m(z), labels, keys, keep, 0.7, 0.3, True, "paper")),
        ("keep", lambda: ops.contrastive_loss(m(z), m(labels), m(keys), keep, 0.7, 0.3, True, "paper")),
        ("z", lambda: ops.contrastive_loss(m(z)[:2], m(labels), m(keys), m(keep), 0.7, 0.3, True, "paper")),
        ("keys", lambda: ops.contrastive_loss(m(z), m(labels), m(keys).int(), m(keep), 0.7, 0.3, True, "paper")),
        ("tau_hard", lambda: ops.contrastive_loss(m(z), m(labels), m(keys), m(keep), 0.7, 0.0, True, "paper")),
        ("formulation", lambda: ops.contrastive_loss(m(z), m(labels), m(keys), m(keep), 0.7, 0.3, True, "x")),
        ("pixstats", lambda: ops.contrastive_loss_backward(m(grad), m(z), m(labels), m(keys), m(keep), m(queries),
                                                           m(pixstats)[:, :, :5], m(termstats), 0.7, 0.3, True,
                                                           "paper")),
        ("queries", lambda: ops.contrastive_loss_backward(m(grad), m(z), m(labels), m(keys), m(keep),
                                                          m(queries).double(), m(pixstats), m(termstats), 0.7, 0.3,
                                                          True, "paper")),
        ("termstats", lambda: ops.contrastive_loss_backward(m(grad), m(z), m(labels), m(keys), m(keep), m(queries),
                                                            m(pixstats), termstats, 0.7, 0.3, True, "paper")),
        ("queries", lambda: ops.contrastive_loss_backward(m(grad), m(z), m(labels), m(keys), m(keep), m(queries),
                                                          m(pixstats), m(termstats), 0.7, 0.3, False, "paper")),
        ("grad", lambda: ops.contrastive_loss_backward(m(torch.ones(2)), m(z), m(labels), m(keys), m(keep),
                                                       m(queries), m(pixstats), m(termstats), 0.7, 0.3, True,
                                                       "paper")),
    ]


@pytest.mark.parametrize("index", range(len(_fake_cases())))
def test_fake_kernels_check_like_the_real_ones(index):
    name, call = _fake_cases()[index]
    with pytest.raises(ValueError) as info:
        call()
    assert str(info.value).startswith(name), str(info.value)


def test_fake_kernels_give_the_real_shapes():
    b, labels, keys, keep = _tiny(dtype=torch.float32)
    real = _opcheck_cases(devices.Device("cpu", "cpu"))
    for name, args in real.items():
        meta_args = tuple(_meta(a.detach()) if isinstance(a, torch.Tensor) else a for a in args)
        got = getattr(ops, name)(*meta_args)
        want = getattr(ops, name)(*args)
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        assert [(t.shape, t.dtype) for t in got] == [(t.shape, t.dtype) for t in want], name
        assert all(t.device.type == "meta" for t in got), name
    # the public API runs on meta tensors through the fake kernels (shape inference)
    z = _meta(b["z"]).requires_grad_(True)
    loss, stats = cm.query_sharing_contrastive_loss(z, _meta(b["masks"]), _meta(b["cams"]), _meta(b["is_novel"]),
                                                    seed=0, return_stats=True)
    assert loss.device.type == "meta" and loss.shape == () and stats.q_pos.shape == (b["z"].shape[1],)


# ------------------------------------------------------------------------------------------------
# LossStats: one computation for both paths, with no data-dependent shape (no host sync on CUDA)
# ------------------------------------------------------------------------------------------------

def test_stats_have_no_data_dependent_shapes():
    # Boolean-mask indexing (keys[keep]) makes a shape that depends on the data: on CUDA it waits for the
    # device (a host sync) and fake tensors cannot trace it. The stats must run on fake tensors, and both
    # paths must use the one loss_stats.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from contrastmask_ops import functional, reference, stats

    assert functional.loss_stats is reference.loss_stats is stats.loss_stats
    b = blob_batch(8, 14, 14, 8, seed=3)
    valid = torch.ones(8, dtype=torch.bool)
    valid[2] = False
    args = (b["z"], b["masks"], b["cams"], b["is_novel"])
    want_loss, want = cm.query_sharing_contrastive_loss(*args, valid=valid, seed=5, return_stats=True)
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in args + (valid,)]
        loss, stats = cm.query_sharing_contrastive_loss(*fake[:4], valid=fake[4], seed=5, return_stats=True)
    assert loss.shape == () and stats.kept.shape == () and stats.keys_per_set.shape == (4,)
    assert stats.q_pos.shape == want.q_pos.shape == (8,)
