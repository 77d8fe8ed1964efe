"""minift: on-device LLM fine-tuning on a small lazy tensor framework."""
from minift.tensor import Tensor, no_grad
from minift.dtype import dtypes
from minift.device import available_devices
from minift.helpers import GlobalCounters
from minift.jit import jit

__all__ = ["Tensor", "no_grad", "dtypes", "jit", "available_devices", "GlobalCounters"]
