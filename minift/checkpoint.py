"""Files that must never be half-written: adapters, weights, checkpoints.

Everything is written to a temporary file in the same folder, flushed and fsynced, then
renamed over the target (atomic on POSIX), and the folder is fsynced so the rename survives a
power cut. A folder (an adapter or an HF model) is written as a sibling temp folder and
swapped in, so a reader sees the old folder or the new one, never a mix.
"""
import contextlib, json, os, shutil, tempfile
import numpy as np
from minift.errors import UserError, name_file


def _fsync_dir(path):
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_file(path, mode="wb"):
  """with atomic_file(p) as f: ...  -- p appears complete or not at all."""
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(folder)
  except BaseException as e:
    with contextlib.suppress(OSError): os.unlink(tmp)
    name_file(e, path)
    raise


def write_json(path, obj):
  with atomic_file(path, "w") as f: json.dump(obj, f, indent=2, sort_keys=True)


SAFETENSORS_DTYPES = {np.dtype(t): n for t, n in [(np.float64, "F64"), (np.float32, "F32"), (np.float16, "F16"), (np.int64, "I64"),
                                                   (np.int32, "I32"), (np.int16, "I16"), (np.int8, "I8"), (np.uint8, "U8"), (np.bool_, "BOOL")]}


class Later:
  """A tensor for save_safetensors made only when its turn to be written comes: a checkpoint
  of a sharded run pages its tensors in one at a time instead of holding them all at once.
  make() gives the array, or its row blocks in order (a split weight, piece by piece)."""
  def __init__(self, shape, dtype, make): self.shape, self.dtype, self.make = tuple(shape), np.dtype(dtype), make

  def blocks(self):
    """The array's row blocks, in order: [the array] where make() gave it whole."""
    made = self.make()
    return [made] if isinstance(made, np.ndarray) else made

  def array(self):
    """The whole array, its blocks joined."""
    blocks = list(self.blocks())
    return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)


def save_safetensors(path, tensors, metadata=None):
  """tensors: {name: np.ndarray or Later}; written atomically in the safetensors format, one
  tensor at a time straight to the file (the library's save() would build the whole file in
  memory first: twice the size of the tensors, at the moment a phone has least to spare)."""
  header, offset = {}, 0
  if metadata: header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  for name in sorted(tensors):
    t = tensors[name]
    if np.dtype(t.dtype) not in SAFETENSORS_DTYPES: raise ValueError(f"{path}: cannot save {name!r} of dtype {t.dtype} as safetensors")
    size = int(np.prod(t.shape, dtype=np.int64)) * np.dtype(t.dtype).itemsize
    header[name] = {"dtype": SAFETENSORS_DTYPES[np.dtype(t.dtype)], "shape": [int(n) for n in t.shape], "data_offsets": [offset, offset + size]}
    offset += size
  head = json.dumps(header, separators=(",", ":")).encode()
  head += b" " * (-len(head) % 8)   # the data starts 8-byte aligned
  with atomic_file(path) as f:
    f.write(len(head).to_bytes(8, "little") + head)
    for name in sorted(tensors):
      t = tensors[name]
      blocks, rows = (t.blocks() if isinstance(t, Later) else [t]), 0
      for block in blocks:
        arr = np.asarray(block, order="C")   # (ascontiguousarray makes a 0-d array 1-d)
        if arr.shape[1:] != t.shape[1:] or arr.dtype != np.dtype(t.dtype) or (not t.shape and arr.shape):
          raise ValueError(f"{path}: {name!r} came out {arr.dtype}{arr.shape}, not {np.dtype(t.dtype)}{t.shape}")
        rows += arr.shape[0] if t.shape else 1
        f.write(arr.reshape(-1).view(np.uint8).data if arr.size else b"")
        del arr, block
      if rows != (t.shape[0] if t.shape else 1): raise ValueError(f"{path}: {name!r} came out with {rows} rows, not {t.shape[0]}")
      del blocks   # let this tensor go before the next is made


@contextlib.contextmanager
def atomic_folder(path):
  """with atomic_folder(p) as tmp: write files into tmp -- then tmp replaces p as a whole.
  An existing p is kept until the new folder is complete (then moved aside and deleted)."""
  path = os.path.abspath(path)
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=parent)
  try:
    yield tmp
    for name in os.listdir(tmp):
      _fsync_file(os.path.join(tmp, name))
    _fsync_dir(tmp)
    old = None
    if os.path.exists(path):
      old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(path) + "-", dir=parent)
      os.rmdir(old)
      os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(parent)
    if old: shutil.rmtree(old, ignore_errors=True)
  except BaseException as e:
    shutil.rmtree(tmp, ignore_errors=True)
    name_file(e, path)
    raise


def _fsync_file(path):
  if os.path.isfile(path):
    with open(path, "rb") as f: os.fsync(f.fileno())


def check_writable(folder, flag="--out"):
  """Create folder if needed and prove a file can be written there, or raise naming the flag."""
  try:
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"): pass
  except OSError as e:
    raise UserError(f"{flag} {folder}: cannot write there ({e.strerror})") from None
