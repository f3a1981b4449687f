"""Fake kernels of the compiled operators (torch.compile, FakeTensor, meta tensors). register() adds them for
torch.ops.contrastmask when the package is imported with the extension built, and for another namespace
holding the same schemas (the tests' CUDA emulation build, torch.ops.contrastmask_emu).

They check what the real kernels check without reading data (shapes, dtypes, devices, parameters; through
_validation, which the public API uses too), so a call the real kernel rejects is rejected under fake
tensors as well, and mixed devices (say z on the CPU and cams on meta) raise instead of returning memory
nobody wrote."""
import torch

from . import _ext  # noqa: F401  (loads the library that defines the ops)
from . import _validation


def _acc_dtype(z):
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def _check_sampling(sigma, min_keys, roi_offset, num_rois):
    # hard_sqdist and seed: any int64 (the schema's type), as in the kernels.
    _validation.sigma_param(sigma)
    _validation.integer("min_keys", min_keys, minimum=0)
    _validation.roi_offset_param(roi_offset, num_rois)


def _check_seed(seed, ref_name, ref):
    # The tensor seed of the default overloads (the .int_seed ones decompose into them).
    _validation.seed_param(seed)
    _validation.check_seed_device(seed, ref_name, ref)


def _check_loss(z, labels, keys, keep, tau_easy, tau_hard, formulation):
    _validation.check_loss_tensors(z, labels, keys, keep)
    # The raw op accepts tau = inf (1/tau = 0); the public API asks for finite temperatures.
    _validation.temperature("tau_easy", tau_easy, finite=False)
    _validation.temperature("tau_hard", tau_hard, finite=False)
    _validation.formulation_param(formulation)


def _saved_shapes(z, share_queries):
    n, c, h, w = z.shape
    groups = 1 if share_queries else n
    # queries: q+, q- and their lo parts (csrc/contrastmask/loss_math.h, kQueryRows; DESIGN, "Saved tensors")
    return {"queries": (groups, 4, c), "pixstats": (n, 4, h * w), "termstats": (groups, 4, 4)}


def _stage_shapes(z, share_queries):
    """Shapes of the tensors between the loss's stages (csrc/ops/loss_inputs.h, stage_tensors; DESIGN, "Global
    query sharing"): name -> (shape, dtype)."""
    n, c, h, w = z.shape
    groups = 1 if share_queries else n
    acc = _acc_dtype(z)
    saved = _saved_shapes(z, share_queries)
    return {"query_sums": ((groups, 2, c), torch.float64), "counts": ((3,), torch.float64),
            "queries": (saved["queries"], acc), "pixstats": (saved["pixstats"], acc), "lse": ((groups, 4, 2), acc),
            "termstats": (saved["termstats"], acc), "pos_sums": ((groups, 4, 3), acc),
            "coef": ((n, 8, h * w), acc), "dq": ((groups, 2, c), acc), "beta": ((groups, 2), torch.float64)}


def _check_stage(z, share_queries, why="what the previous stage returns for this z", **tensors):
    """Each tensor has the shape, dtype and device its stage (or the forward, for the backward's saved
    tensors) gives it for this z."""
    shapes = _stage_shapes(z, share_queries)
    for name, t in tensors.items():
        shape, dtype = shapes[name]
        _validation.check_tensor(name, t, len(shape), str(shape))
        _validation._require(tuple(t.shape) == shape, ValueError,
                             lambda name=name, t=t, shape=shape: f"{name} must have shape {shape} ({why}), "
                                                                 f"got {tuple(t.shape)}")
        _validation.check_dtype(name, t, (dtype,), str(dtype))
        _validation.check_same_device(name, t, "z", z)


def _check_grad(name, grad, z):
    _validation._require(grad.dim() == 0, ValueError,
                         lambda: f"{name} must be the gradient of a scalar loss (shape ()), got shape "
                                 f"{tuple(grad.shape)}")
    _validation._require(grad.is_floating_point(), ValueError,
                         lambda: f"{name} must have a floating-point dtype, got {grad.dtype}")
    _validation.check_same_device(name, grad, "z", z)


def _stage_outputs(z, share_queries, *names):
    shapes = _stage_shapes(z, share_queries)
    return tuple(z.new_empty(shapes[name][0], dtype=shapes[name][1]) for name in names)


def register(namespace: str = "contrastmask"):
    """Fake kernels for the operators of torch.ops.<namespace>."""

    @torch.library.register_fake(namespace + "::partition")
    def _(masks, cams, is_novel, valid, delta, check_inputs=True):
        _validation.partition_args(masks, cams, is_novel, valid, delta)
        _validation.flag("check_inputs", check_inputs)
        return masks.new_empty(masks.shape, dtype=torch.int8)

    @torch.library.register_fake(namespace + "::boundary_sqdist")
    def _(masks, check_inputs=True):
        _validation.check_masks(masks)
        _validation.flag("check_inputs", check_inputs)
        return masks.new_empty(masks.shape, dtype=torch.int32)

    @torch.library.register_fake(namespace + "::sample_keys")
    def _(labels, sqdist, is_novel, sigma, hard_sqdist, min_keys, seed, roi_offset=0):
        _validation.check_sample_tensors(labels, sqdist, is_novel)
        _check_sampling(sigma, min_keys, roi_offset, labels.shape[0])
        _check_seed(seed, "labels", labels)
        return labels.new_empty(labels.shape, dtype=torch.uint8), labels.new_empty(labels.shape[:1], dtype=torch.bool)

    def roi_plan(masks, cams, is_novel, valid, delta, sigma, min_keys, seed, roi_offset, check_inputs):
        _validation.partition_args(masks, cams, is_novel, valid, delta)
        _validation.flag("check_inputs", check_inputs)
        _check_sampling(sigma, min_keys, roi_offset, masks.shape[0])
        _check_seed(seed, "masks", masks)
        return (
            masks.new_empty(masks.shape, dtype=torch.int8),
            masks.new_empty(masks.shape, dtype=torch.uint8),
            masks.new_empty(masks.shape[:1], dtype=torch.bool),
        )

    @torch.library.register_fake(namespace + "::roi_plan")
    def _(masks, cams, is_novel, valid, delta, sigma, hard_sqdist, min_keys, seed, roi_offset=0, check_inputs=True):
        return roi_plan(masks, cams, is_novel, valid, delta, sigma, min_keys, seed, roi_offset, check_inputs)

    @torch.library.register_fake(namespace + "::roi_plan.offset_tensor")
    def _(masks, cams, is_novel, valid, delta, sigma, hard_sqdist, min_keys, seed, roi_offset, check_inputs=True):
        outputs = roi_plan(masks, cams, is_novel, valid, delta, sigma, min_keys, seed, 0, check_inputs)
        _validation._require(isinstance(roi_offset, torch.Tensor) and roi_offset.dim() == 0
                             and roi_offset.dtype == torch.int64, ValueError,
                             lambda: "roi_offset must be a 0-dim int64 tensor")
        _validation._require(roi_offset.device.type == "cpu" or roi_offset.device == masks.device, ValueError,
                             lambda: f"roi_offset is on {roi_offset.device} but masks is on {masks.device}; it must "
                                     "be on the CPU or on the device of masks")
        return outputs

    @torch.library.register_fake(namespace + "::contrastive_loss")
    def _(z, labels, keys, keep, tau_easy, tau_hard, share_queries, formulation):
        _check_loss(z, labels, keys, keep, tau_easy, tau_hard, formulation)
        acc = _acc_dtype(z)
        shapes = _saved_shapes(z, share_queries)
        return (
            z.new_empty(()),
            z.new_empty(shapes["queries"], dtype=acc),
            z.new_empty(shapes["pixstats"], dtype=acc),
            z.new_empty(shapes["termstats"], dtype=acc),
        )

    @torch.library.register_fake(namespace + "::contrastive_loss_backward")
    def _(grad, z, labels, keys, keep, queries, pixstats, termstats, tau_easy, tau_hard, share_queries, formulation):
        _check_loss(z, labels, keys, keep, tau_easy, tau_hard, formulation)
        _check_grad("grad", grad, z)
        # The saved tensors must be what the forward returned for these inputs.
        _check_stage(z, share_queries, "from z and share_queries", queries=queries, pixstats=pixstats,
                     termstats=termstats)
        return torch.empty_like(z, memory_format=torch.contiguous_format)

    # The loss's forward stages (the global loss runs them with collectives in between): each takes
    # (z, labels, keys, keep, *what it takes, tau_easy, tau_hard, share_queries, formulation).
    def forward_stage(name, takes, gives):
        @torch.library.register_fake(f"{namespace}::contrastive_loss_{name}")
        def _(z, labels, keys, keep, *args):
            *stage_inputs, tau_easy, tau_hard, share_queries, formulation = args
            _check_loss(z, labels, keys, keep, tau_easy, tau_hard, formulation)
            _check_stage(z, share_queries, **dict(zip(takes, stage_inputs)))
            return _stage_outputs(z, share_queries, *gives)

    forward_stage("query_sums", (), ("query_sums", "counts"))
    forward_stage("cosines", ("query_sums", "counts"), ("queries", "pixstats", "lse"))
    forward_stage("terms", ("pixstats", "lse"), ("termstats", "pos_sums"))

    @torch.library.register_fake(namespace + "::contrastive_loss_finish")
    def _(z, labels, keys, keep, termstats, pos_sums, counts, tau_easy, tau_hard, share_queries, formulation):
        _check_loss(z, labels, keys, keep, tau_easy, tau_hard, formulation)
        _check_stage(z, share_queries, termstats=termstats, pos_sums=pos_sums, counts=counts)
        return z.new_empty((), dtype=_acc_dtype(z)), torch.empty_like(termstats)

    @torch.library.register_fake(namespace + "::contrastive_loss_query_grads")
    def _(grad, neg_grad, z, labels, keys, keep, queries, pixstats, termstats, counts, tau_easy, tau_hard,
          share_queries, formulation):
        _check_loss(z, labels, keys, keep, tau_easy, tau_hard, formulation)
        _check_grad("grad", grad, z)
        if neg_grad is not None:
            _check_grad("neg_grad", neg_grad, z)
        _check_stage(z, share_queries, queries=queries, pixstats=pixstats, termstats=termstats, counts=counts)
        return _stage_outputs(z, share_queries, "coef", "dq", "beta")

    @torch.library.register_fake(namespace + "::contrastive_loss_dz")
    def _(z, labels, keys, keep, queries, coef, dq, beta, counts, tau_easy, tau_hard, share_queries, formulation):
        _check_loss(z, labels, keys, keep, tau_easy, tau_hard, formulation)
        _check_stage(z, share_queries, queries=queries, coef=coef, dq=dq, beta=beta, counts=counts)
        return torch.empty_like(z, memory_format=torch.contiguous_format)
