"""Python side of the compiled operators: fake kernels (for torch.compile / FakeTensor) and autograd
for torch.ops.contrastmask.*. Importing this module registers them; it is imported by the package
only when the extension is built. register() does the same for another namespace holding the same
schemas (the tests' CUDA emulation build, torch.ops.contrastmask_emu)."""
import torch

from . import _ext  # noqa: F401  (loads the library that defines the ops)


def _acc_dtype(z):
    return torch.float64 if z.dtype == torch.float64 else torch.float32


def register(namespace: str = "contrastmask"):
    """Fake kernels and autograd for the operators of torch.ops.<namespace>."""
    ops = getattr(torch.ops, namespace)

    @torch.library.register_fake(namespace + "::partition")
    def _(masks, cams, is_novel, valid, delta):
        return masks.new_empty(masks.shape, dtype=torch.int8)

    @torch.library.register_fake(namespace + "::boundary_sqdist")
    def _(masks):
        return masks.new_empty(masks.shape, dtype=torch.int32)

    @torch.library.register_fake(namespace + "::sample_keys")
    def _(labels, sqdist, is_novel, sigma, hard_sqdist, min_keys, seed):
        return (labels.new_empty(labels.shape, dtype=torch.uint8),
                labels.new_empty(labels.shape[:1], dtype=torch.bool))

    @torch.library.register_fake(namespace + "::roi_plan")
    def _(masks, cams, is_novel, valid, delta, sigma, hard_sqdist, min_keys, seed):
        return (
            masks.new_empty(masks.shape, dtype=torch.int8),
            masks.new_empty(masks.shape, dtype=torch.uint8),
            masks.new_empty(masks.shape[:1], dtype=torch.bool),
        )

    @torch.library.register_fake(namespace + "::contrastive_loss")
    def _(z, labels, keys, keep, tau_easy, tau_hard, share_queries, formulation):
        n, c, h, w = z.shape
        groups = 1 if share_queries else n
        acc = _acc_dtype(z)
        return (
            z.new_empty(()),
            z.new_empty((groups, 2, c), dtype=acc),
            z.new_empty((n, 4, h * w), dtype=acc),
            z.new_empty((groups, 4, 4), dtype=acc),
        )

    @torch.library.register_fake(namespace + "::contrastive_loss_backward")
    def _(grad, z, labels, keys, keep, queries, pixstats, termstats, tau_easy, tau_hard, share_queries, formulation):
        return torch.empty_like(z, memory_format=torch.contiguous_format)

    def setup_context(ctx, inputs, output):
        z, labels, keys, keep, tau_easy, tau_hard, share_queries, formulation = inputs
        _, queries, pixstats, termstats = output
        ctx.mark_non_differentiable(queries, pixstats, termstats)
        ctx.save_for_backward(z, labels, keys, keep, queries, pixstats, termstats)
        ctx.params = (tau_easy, tau_hard, share_queries, formulation)

    def backward(ctx, grad_loss, _grad_queries, _grad_pixstats, _grad_termstats):
        z, labels, keys, keep, queries, pixstats, termstats = ctx.saved_tensors
        dz = None
        if ctx.needs_input_grad[0]:
            dz = ops.contrastive_loss_backward(grad_loss, z, labels, keys, keep, queries, pixstats, termstats,
                                               *ctx.params)
        return dz, None, None, None, None, None, None, None

    torch.library.register_autograd(namespace + "::contrastive_loss", backward, setup_context=setup_context)


register()
