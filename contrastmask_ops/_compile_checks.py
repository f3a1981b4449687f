"""Errors raised while torch.compile traces a call. Imported only under torch.compile (dynamo is loaded by
then; importing it with the package would cost seconds)."""
import torch._dynamo
from torch._dynamo.exc import UserError, UserErrorType

SEED_UNDER_COMPILE_MESSAGE = ("seed: pass a seed under torch.compile (an integer or a 0-dim int64 tensor; either "
                              "takes a new value each call without recompiling); seed=None draws one on the host, "
                              "which a graph cannot do")


# assume_constant_result: dynamo runs this at trace time instead of tracing it, so the user gets this error
# (with dynamo's pointer to the line) rather than a report of an exception observed in the traced code.
@torch._dynamo.assume_constant_result
def refuse_drawing_a_seed() -> None:
    raise UserError(UserErrorType.INVALID_INPUT, SEED_UNDER_COMPILE_MESSAGE)
