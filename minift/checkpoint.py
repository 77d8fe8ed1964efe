"""Files that must never be half-written or lost: adapters, weights, checkpoints.

Everything is written to a temporary file in the same folder, flushed and fsynced, then
renamed over the target (atomic on POSIX), and the folder is fsynced so the rename survives a
power cut. A folder (an adapter, an HF model, a checkpoint) is written as a sibling temp folder
and exchanged with the old one in one step (atomic_folder), so a reader sees the old folder or
the new one, never a mix and never none; recover_folder and clean_folder undo what a kill
leaves. FolderLock keeps two runs out of one output folder.
"""
import contextlib, ctypes, errno, json, os, platform, shutil, sys, tempfile
import numpy as np
try:
  import fcntl
except ImportError:   # Windows
  fcntl = None
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
def atomic_path(path):
  """with atomic_path(p) as tmp: write the file tmp by any means (a library that opens the path
  itself) -- then it replaces p: p appears complete or not at all. The file gets the
  permissions a plain open() would give it (mkstemp's are owner-only)."""
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=folder)
  os.close(fd)
  try:
    yield tmp
    umask = os.umask(0); os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(folder)
  except BaseException as e:
    with contextlib.suppress(OSError): os.unlink(tmp)
    name_file(e, path)
    raise


@contextlib.contextmanager
def atomic_file(path, mode="wb"):
  """with atomic_file(p) as f: ...  -- p appears complete or not at all (atomic_path, opened)."""
  with atomic_path(path) as tmp, open(tmp, mode) as f:
    yield f


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


class NonFinite(UserError, ValueError):
  """A tensor to be saved holds NaN or infinity (training diverged)."""


def first_non_finite(arr, chunk=1 << 20):
  """The flat index of the first NaN or infinity in arr (a float array), or None. One pass
  without a temporary of the array's size: a finite sum means finite values; only when it is
  not are the values scanned, in chunks (an overflowing sum of large finite values is then
  let through)."""
  if arr.dtype.kind not in "fc" or not arr.size: return None
  if arr.dtype.kind == "f":
    with np.errstate(over="ignore", invalid="ignore"):   # an overflowing or NaN sum is an answer here, not a problem
      if np.isfinite(np.sum(arr, dtype=np.float64 if arr.dtype == np.float64 else np.float32)): return None
  flat = arr.reshape(-1)
  for start in range(0, flat.size, chunk):
    bad = np.flatnonzero(~np.isfinite(flat[start:start + chunk]))
    if bad.size: return start + int(bad[0])
  return None


def all_finite(arr):
  """No NaN or infinity in arr (see first_non_finite)."""
  return first_non_finite(arr) is None


def save_safetensors(path, tensors, metadata=None, finite=False):
  """tensors: {name: np.ndarray or Later}; written atomically in the safetensors format, one
  tensor at a time straight to the file (the library's save() would build the whole file in
  memory first: twice the size of the tensors, at the moment a phone has least to spare).
  finite: a tensor holding NaN or infinity raises NonFinite, and nothing is written."""
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
        if finite and not all_finite(arr): raise NonFinite(f"{name} holds NaN or infinity")
        rows += arr.shape[0] if t.shape else 1
        f.write(arr.reshape(-1).view(np.uint8).data if arr.size else b"")
        del arr, block
      if rows != (t.shape[0] if t.shape else 1): raise ValueError(f"{path}: {name!r} came out with {rows} rows, not {t.shape[0]}")
      del blocks   # let this tensor go before the next is made


@contextlib.contextmanager
def atomic_folder(path):
  """with atomic_folder(p) as tmp: write files into tmp -- then tmp replaces p as a whole.

  There is a complete folder at p at every instant, or (killed mid-swap on a file system that
  cannot exchange two names) one recover_folder(p) puts back: tmp is `.tmp-NAME-*` while it is
  written (never complete), renamed `.swap-NAME-*` once it is (always complete), then exchanged
  with p in one step (renameat2 RENAME_EXCHANGE); the old folder, now under the `.swap-` name,
  is deleted. Where the exchange is refused, p is moved aside as `.old-NAME-*` and the new
  folder renamed in: a kill between the two leaves p missing and both complete folders next
  to it."""
  path = os.path.abspath(path)
  parent, name = os.path.split(path)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
  try:
    yield tmp
    for entry in os.listdir(tmp): _fsync_file(os.path.join(tmp, entry))
    _fsync_dir(tmp)
  except BaseException as e:
    _remove(tmp)
    name_file(e, path)   # a full disk while writing: the line the user sees names the folder
    raise
  _reached("written", path)
  ready = os.path.join(parent, ".swap-" + os.path.basename(tmp)[len(".tmp-"):])
  try:
    os.rename(tmp, ready)
  except BaseException:
    _remove(tmp)
    raise
  _fsync_dir(parent)
  _reached("ready", path)
  try:
    _swap_in(ready, path)
  except BaseException:
    _remove(ready)   # not yet swapped in (a failed rename puts the old folder back first)
    raise


def _swap_in(ready, path):
  """Put the complete folder `ready` at path, safe at every instant (see atomic_folder)."""
  parent = os.path.dirname(path)
  if not os.path.lexists(path):
    os.rename(ready, path)
    _fsync_dir(parent)
    _reached("renamed in", path)
    return
  if exchange(ready, path):   # one step: the new folder at path, the old one under ready's name
    _fsync_dir(parent)
    _reached("exchanged", path)
    _remove(ready)
    _reached("done", path)
    return
  old = os.path.join(parent, ".old-" + os.path.basename(ready)[len(".swap-"):])
  os.rename(path, old)
  _reached("moved aside", path)
  try:
    os.rename(ready, path)
  except BaseException:
    os.rename(old, path)
    raise
  _fsync_dir(parent)
  _reached("renamed in", path)
  _remove(old)
  _reached("done", path)


def _reached(step, path):
  """Called after each step of a folder swap (tests replace it to kill the process there)."""


def _remove(path):
  if os.path.isdir(path) and not os.path.islink(path): shutil.rmtree(path, ignore_errors=True)
  else:
    with contextlib.suppress(OSError): os.unlink(path)


# ---- swapping two names in one step: renameat2(RENAME_EXCHANGE), Linux 3.15+

AT_FDCWD, RENAME_EXCHANGE = -100, 2
# renameat2's number where the C library lacks the wrapper (glibc before 2.28)
_RENAMEAT2_SYSCALL = {"x86_64": 316, "aarch64": 276, "arm64": 276, "riscv64": 276, "armv7l": 382, "armv8l": 382,
                      "i386": 353, "i686": 353, "ppc64le": 357, "ppc64": 357, "s390x": 347}
_renameat2_fn = None


def _renameat2():
  """A function (olddirfd, old, newdirfd, new, flags) -> 0 or -1 (errno set), or None."""
  global _renameat2_fn
  if _renameat2_fn is None:
    _renameat2_fn = False
    if sys.platform.startswith("linux") or sys.platform == "android":
      try:
        libc = ctypes.CDLL(None, use_errno=True)
      except OSError:
        return None
      if hasattr(libc, "renameat2"):
        fn = libc.renameat2
        fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint], ctypes.c_int
        _renameat2_fn = fn
      # Android's seccomp filter kills apps for system calls its C library does not offer: no raw call there
      elif platform.machine() in _RENAMEAT2_SYSCALL and not hasattr(sys, "getandroidapilevel"):
        number, syscall = _RENAMEAT2_SYSCALL[platform.machine()], libc.syscall
        syscall.restype = ctypes.c_long
        _renameat2_fn = lambda *a: syscall(ctypes.c_long(number), ctypes.c_int(a[0]), ctypes.c_char_p(a[1]), ctypes.c_int(a[2]),
                                           ctypes.c_char_p(a[3]), ctypes.c_uint(a[4]))
  return _renameat2_fn or None


def exchange(a, b):
  """Swap the names a and b (both must exist) in one atomic step. False where this system or
  file system cannot (not Linux, an old kernel, a file system without RENAME_EXCHANGE);
  other failures raise OSError."""
  fn = _renameat2()
  if fn is None: return False
  if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0: return True
  err = ctypes.get_errno()
  if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM): return False   # EPERM: a seccomp filter
  raise OSError(err, os.strerror(err), a, None, b)


# ---- what a killed run leaves behind

def _siblings(parent, name):
  """{kind: [paths]} of the `.tmp-`, `.swap-` and `.old-` folders atomic_folder made for name."""
  found = {"tmp": [], "swap": [], "old": []}
  for entry in os.listdir(parent):
    for kind in found:
      prefix = f".{kind}-{name}-"
      if entry.startswith(prefix) and "-" not in entry[len(prefix):]: found[kind].append(os.path.join(parent, entry))
  return found


def recover_folder(path):
  """Undo what a kill in the middle of atomic_folder(path) left: if path is missing, the newest
  complete folder next to it (a `.swap-` one: the new folder; else an `.old-` one: the
  previous) is renamed to path; every other leftover is deleted. Call it while no other
  process writes path (under FolderLock). Returns the folder put back, or None."""
  path = os.path.abspath(path)
  parent, name = os.path.split(path)
  if not os.path.isdir(parent): return None
  found, restored = _siblings(parent, name), None
  if not os.path.lexists(path):
    complete = sorted(found["swap"], key=os.path.getmtime) or sorted(found["old"], key=os.path.getmtime)
    if complete:
      restored = complete[-1]
      os.rename(restored, path)
      _fsync_dir(parent)
  for kind in found:
    for leftover in found[kind]:
      if leftover != restored: _remove(leftover)
  return restored


def complete_folder(path):
  """For a reader: path if it exists, else the complete folder recover_folder(path) would
  put back (without moving it), else path."""
  parent, name = os.path.split(os.path.abspath(path))
  if os.path.lexists(path) or not os.path.isdir(parent): return path
  found = _siblings(parent, name)
  complete = sorted(found["swap"], key=os.path.getmtime) or sorted(found["old"], key=os.path.getmtime)
  return complete[-1] if complete else path


def clean_folder(folder):
  """Recover every folder in `folder` that atomic_folder was swapping when a run was killed, and
  delete temporary files of killed writers (atomic_file's `.tmp-*`, check_writable's). Only
  while holding FolderLock(folder)."""
  if not os.path.isdir(folder): return
  for entry in os.listdir(folder):
    full = os.path.join(folder, entry)
    for kind in ("swap", "old"):
      prefix = f".{kind}-"
      if entry.startswith(prefix) and "-" in entry[len(prefix):] and os.path.lexists(full):
        recover_folder(os.path.join(folder, entry[len(prefix):].rsplit("-", 1)[0]))
    if entry.startswith((".tmp-", ".write-test-")) and os.path.lexists(full): _remove(full)


# ---- one run per folder

class FolderBusy(UserError, RuntimeError):
  """Another live process holds the folder's lock."""


class FolderLock:
  """An exclusive lock on folder (flock on its `.lock` file) held until release() or the end of
  this process, however it ends: the kernel drops the lock of a killed process."""

  def __init__(self, folder, flag="--out"):
    self.fd = None
    if fcntl is None: return   # (Windows) no flock: unlocked
    os.makedirs(folder, exist_ok=True)
    fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
      os.close(fd)
      raise FolderBusy(f"{flag} {folder} is in use by another run (process {holder or 'unknown'}); "
                       f"wait for it to end or choose another {flag}") from None
    except OSError:   # a file system without locks (some network mounts): go on unlocked
      os.close(fd)
      return
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    self.fd = fd

  def release(self):
    if self.fd is not None:
      os.close(self.fd)   # (the file stays: deleting it would let two runs lock two different files)
      self.fd = None

  def __enter__(self): return self
  def __exit__(self, *exc): self.release()


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
