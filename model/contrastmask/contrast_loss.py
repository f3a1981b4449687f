"""The one place the model reaches the contrastive loss. The public API runs the compiled operator
whenever the extension holds kernels for the tensors' device (else the pure-PyTorch reference, with a
warning; docs/DESIGN.md, "Device dispatch")."""
import contrastmask_ops
from contrastmask_ops import query_sharing_contrastive_loss


def backend(device_type="cpu"):
    """'compiled' when the extension holds kernels for this device type, else 'reference': the same
    answer the public API's dispatch gives (build_info() reads the kernels the build registered)."""
    return "compiled" if contrastmask_ops.build_info()["cuda" if device_type == "cuda" else "cpu"] else "reference"


__all__ = ["query_sharing_contrastive_loss", "backend"]
