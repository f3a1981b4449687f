"""The one place the model reaches the contrastive loss. The public API runs the compiled operator
whenever the extension is built (else the pure-PyTorch reference, with a warning)."""
from contrastmask_ops import query_sharing_contrastive_loss


def backend(device_type="cpu"):
    """'compiled' when the extension holds kernels for this device type, else 'reference'."""
    try:
        import contrastmask_ops

        info = contrastmask_ops.build_info()
    except (ImportError, AttributeError):
        return "reference"
    return "compiled" if info.get("cuda" if device_type == "cuda" else "cpu") else "reference"


__all__ = ["query_sharing_contrastive_loss", "backend"]
