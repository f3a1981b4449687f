"""The one place the model reaches the contrastive loss. The public API runs the compiled operator
whenever the extension is built (else the pure-PyTorch reference, with a warning)."""
try:
    from contrastmask_ops import query_sharing_contrastive_loss
except ImportError:  # an older checkout without the public API
    from contrastmask_ops.reference import query_sharing_contrastive_loss


def backend(device_type="cpu"):
    """'compiled' when the extension holds kernels for this device type, else 'reference'."""
    try:
        import contrastmask_ops

        info = contrastmask_ops.build_info()
    except (ImportError, AttributeError):
        return "reference"
    return "compiled" if info.get("cuda" if device_type == "cuda" else "cpu") else "reference"


def contrast_weight(progress, start=0.25, end=1.0, warmup=1.0):
    """lambda of Eq. 5, warmed up linearly from start to end over `warmup` units of progress."""
    if warmup <= 0:
        return end
    t = min(max(progress / warmup, 0.0), 1.0)
    return start + (end - start) * t


__all__ = ["query_sharing_contrastive_loss", "backend", "contrast_weight"]
