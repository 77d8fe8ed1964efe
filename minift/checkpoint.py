"""Files that must never be half-written: adapters, weights, checkpoints.

Everything is written to a temporary file in the same folder, flushed and fsynced, then
renamed over the target (atomic on POSIX), and the folder is fsynced so the rename survives a
power cut. A folder (an adapter or an HF model) is written as a sibling temp folder and
swapped in, so a reader sees the old folder or the new one, never a mix.
"""
import contextlib, json, os, shutil, tempfile
import numpy as np


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
  except BaseException:
    with contextlib.suppress(OSError): os.unlink(tmp)
    raise


def write_json(path, obj):
  with atomic_file(path, "w") as f: json.dump(obj, f, indent=2, sort_keys=True)


def save_safetensors(path, tensors, metadata=None):
  """tensors: {name: np.ndarray}; written atomically."""
  from safetensors.numpy import save
  blob = save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata=metadata)
  with atomic_file(path) as f: f.write(blob)


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
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
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
    raise PermissionError(f"{flag} {folder}: cannot write there ({e.strerror})") from None
