"""Quantized frozen weights: a LoRA base kept as the GGUF file stores it (QLoRA on GGUF).

A weight matrix of a quantized dtype (dtypes.q8_0, q4_0, q4_1, q5_0, q5_1, q2_k, q3_k, q4_k,
q5_k, q6_k: GGUF's block formats, kernels/dequant.h lays them out) is a Tensor whose buffer holds
the blocks' bytes, memory-mapped from the GGUF file where the layout allows (Tensor.from_quantized).
Its rows are whole blocks, so element i of the weight is element i % block of block i // block,
whatever view reads it. What may read it:
  * a matmul (x @ W.T forward, g @ W for the input gradient): Tensor.matmul makes the weight
    float32 lazily (DEQUANT) and the scheduler hands the matmul the quantized buffer itself
    (schedule.narrow_source); the backend dequantizes inside its kernel (NumPy: a panel at a time
    for BLAS, backends/numpy/quant.py; OpenCL: in the tiled matmul's loads);
  * an embedding lookup (its rows come out float32; a tied LM head is then the same quantized
    table read by the matmuls above, and by linear_cross_entropy's chunks);
  * dequantize() anywhere else: a kernel of its own (DEQUANT) that writes float32.
Nothing else takes one (the op raises), and it never gets a gradient (function.graph_node): LoRA's
adapters train, the base does not. A backend without quantized kernels (Device.quantized_types)
gets float32 weights at load, with one log line; so does a type no backend reads (BF16 -> float32).

Loading: `base_dtype` says how the frozen weights are stored (models.load(dtype=...), the tools'
--base_dtype): keep (as the file stores them: quantized GGUF blocks stay quantized, F16 stays
float16), float32, float16, or q8_0 / q4_0 (quantized on load, gguf's quantizer; a GGUF tensor
already of that type is kept as it is). Only matmul weights are quantized: Linear weights and the
token embedding table; norms, biases and position tables stay float32.
"""
from collections import Counter
import numpy as np
from minift.dtype import dtypes
from minift.helpers import log

BASE_DTYPES = ("keep", "float32", "float16", "q8_0", "q4_0")
QUANTIZE_TO = ("q8_0", "q4_0")   # what quantize() writes (gguf's quantizer covers more; these are the useful two)


def ggml_type(dtype):
  """The gguf.GGMLQuantizationType of a quantized dtype."""
  import gguf
  return gguf.GGMLQuantizationType[dtype.name.upper()]


def quantized_dtype(type_name):
  """The quantized dtype of a GGML type name ('Q4_K'), or None for a type that is not one (F32, F16, BF16)."""
  try: d = dtypes.from_any(type_name)
  except TypeError: return None
  return d if d.is_quantized else None


# byte offsets of each type's fp16 scale fields in its block (kernels/dequant.h lays them out): a
# block's values are small integers times these, so they are all finite when these are
SCALE_OFFSETS = {"q8_0": (0,), "q4_0": (0,), "q4_1": (0, 2), "q5_0": (0,), "q5_1": (0, 2), "q2_k": (80, 82), "q3_k": (108,),
                 "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,)}


def first_non_finite_block(raw, dtype):
  """The index of the first block of raw (a quantized buffer's bytes) with an infinite or NaN
  scale, or None: what a damaged file shows (checked at load without dequantizing)."""
  blocks = np.asarray(raw, np.uint8).reshape(-1, dtype.itemsize)
  bad = np.zeros(blocks.shape[0], bool)
  for off in SCALE_OFFSETS[dtype.name]: bad |= (blocks[:, off + 1] & 0x7c) == 0x7c   # fp16 exponent all ones
  return int(np.argmax(bad)) if bad.any() else None


QUANTIZE_VALUES = 1 << 22   # values quantized at a time: gguf's quantizer makes several float32 temporaries of its input


def quantize(arr, dtype, out=None):
  """A float array (rows, K), K a multiple of the block, as the bytes of its blocks: uint8 (rows,
  K / block * bytes), written into out when given; gguf's quantizer, a few million values at a time."""
  import gguf
  dtype = dtypes.from_any(dtype)
  arr = np.asarray(arr).reshape(-1, arr.shape[-1])
  if out is None: out = np.empty((arr.shape[0], dtype.nbytes(arr.shape[1])), np.uint8)
  step = max(1, QUANTIZE_VALUES // max(1, arr.shape[1]))
  for r in range(0, arr.shape[0], step):
    out[r:r + step] = gguf.quants.quantize(np.ascontiguousarray(arr[r:r + step], np.float32), ggml_type(dtype))
  return out


def dequantize_reference(raw, dtype, shape):
  """gguf's own dequantizer (the reference): the float32 values of a quantized buffer."""
  import gguf
  dtype = dtypes.from_any(dtype)
  rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
  return gguf.quants.dequantize(np.asarray(raw, np.uint8).reshape(rows, -1), ggml_type(dtype)).reshape(shape)


def device_types():
  """The quantized dtype names the backend tensors are made on reads (Device.quantized_types)."""
  from minift.runtime.device import canonical_device, get_device
  return get_device(canonical_device()).quantized_types


_noted = set()


def note_once(message):
  """Log message once per process."""
  if message not in _noted:
    _noted.add(message)
    log.info(message)


class BaseStorage:
  """How a loader stores each frozen weight under a base dtype (see the module's docstring):
  quantizable names the parameters only matmuls and lookups read (io_hf.quantizable); the
  dtype each parameter gets, and the notes of what could not be kept as asked, logged in one line
  per reason once the model is loaded (log())."""

  def __init__(self, base_dtype, quantizable):
    base_dtype = "float32" if base_dtype is None else (base_dtype.name if hasattr(base_dtype, "name") else str(base_dtype))
    base_dtype = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16"}.get(base_dtype, base_dtype)
    if base_dtype not in BASE_DTYPES:
      raise ValueError(f"base dtype {base_dtype!r}: expected one of {', '.join(BASE_DTYPES)}")
    self.kind, self.quantizable, self.kernels = base_dtype, set(quantizable), device_types()
    self.notes = Counter()

  def target(self, name, stored, shape):
    """The dtype parameter `name` is stored in; stored: the file's type name (GGML's F32, F16,
    BF16, Q4_K, ...; safetensors' F32, F16, BF16)."""
    matrix = len(shape) >= 2
    if self.kind == "float32": return dtypes.float32
    if self.kind == "float16": return dtypes.float16 if matrix else dtypes.float32
    want = quantized_dtype(stored) if self.kind == "keep" else dtypes.from_any(self.kind)
    if want is None:   # keep a float type: F16 matrices stay float16; BF16 (no kernel reads it) becomes float32
      if stored.upper() == "F16" and matrix: return dtypes.float16
      if stored.upper() not in ("F32", "F16"): self.notes[f"{stored} has no kernel: made float32"] += 1
      return dtypes.float32
    if name not in self.quantizable or len(shape) != 2: return dtypes.float32   # added, not multiplied: kept float
    if shape[-1] % want.block:
      self.notes[f"rows of {shape[-1]} values are no whole {want.name} blocks: kept float32"] += 1
      return dtypes.float32
    if want.name not in self.kernels:
      self.notes[f"{want.name} has no kernel on this backend: made float32"] += 1
      return dtypes.float32
    return want

  def log(self, where):
    for why, n in sorted(self.notes.items()): log.info(f"{where}: {n} weight(s): {why}")


# ---- the tools' flags

def add_flags(ap, what="the frozen weights"):
  """--base_dtype (alias --dtype) and --quantize on a tool's ArgumentParser."""
  ap.add_argument("--base_dtype", "--dtype", dest="base_dtype", choices=BASE_DTYPES, default=None,
                  help=f"storage of {what}: keep (as the file stores them: a GGUF's quantized blocks stay quantized, "
                       "the default for a .gguf), float32 (the default for an HF folder), float16, q8_0 or q4_0 "
                       "(quantized on load); computation stays float32")
  ap.add_argument("--quantize", choices=QUANTIZE_TO, default=None,
                  help="quantize the weight matrices on load (an HF folder trains as QLoRA): the same as --base_dtype q8_0 or q4_0")


def base_dtype_of(base_dtype, quantize, model_path):
  """The base dtype the flags ask for (models.load's dtype): --quantize, else --base_dtype, else
  keep for a GGUF file and float32 for an HF folder."""
  from minift.errors import UsageError
  import os
  if quantize is not None:
    if base_dtype not in (None, quantize): raise UsageError(f"--quantize {quantize} and --base_dtype {base_dtype} disagree: give one of them")
    return quantize
  if base_dtype is not None: return base_dtype
  return "float32" if os.path.isdir(model_path) else "keep"
