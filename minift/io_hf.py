"""Hugging Face model folders: config.json, model.safetensors (or shards with an index) and a
tokenizer.

Safetensors files are memory-mapped read-only: a float32 tensor becomes a minift Tensor over the
file's pages (nothing is read until used, and the pages can be dropped again under memory
pressure); other dtypes are converted one tensor at a time, so loading never holds two copies
of the model. Every tensor is checked against the model: a
missing, unexpected or wrong-shaped one is an error that names it and its file.
"""
import json, mmap, os
import numpy as np
from minift.errors import FileError, MissingFile, read_json
from minift.checkpoint import first_non_finite
from minift.sharder import active as active_sharder
from minift.tensor import Tensor
from minift.dtype import dtypes
from minift.quant import BaseStorage, QUANTIZE_VALUES, quantize, quantized_dtype, first_non_finite_block


class SafetensorsFile:
  """A safetensors file, memory-mapped. Layout: u64 header size, JSON header
  {name: {dtype, shape, data_offsets: [begin, end]}}, then the tensor bytes."""
  DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I64": np.int64,
            "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}

  def __init__(self, path):
    self.path = path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
      head = f.read(8)
      if len(head) < 8: raise FileError(f"{path}: not a safetensors file ({size} bytes, too short for a header)")
      n = int.from_bytes(head, "little")
      if n > size - 8: raise FileError(f"{path}: truncated or not a safetensors file (header says {n} bytes, file has {size})")
      try: header = json.loads(f.read(n))
      except (UnicodeDecodeError, json.JSONDecodeError) as e: raise FileError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict): raise FileError(f"{path}: corrupt safetensors header (not a JSON object)")
    self.metadata = header.pop("__metadata__", None) or {}
    self.start, self.header = 8 + n, header
    for name, info in header.items():
      try:
        dtype, (begin, end), shape = info["dtype"], info["data_offsets"], [int(d) for d in info["shape"]]
      except (TypeError, KeyError, ValueError):
        raise FileError(f"{path}: corrupt safetensors header (entry {name!r} lacks a dtype, shape or data_offsets)") from None
      if dtype not in self.DTYPES: raise FileError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
      want = int(np.prod(shape, dtype=np.int64)) * np.dtype(self.DTYPES[dtype]).itemsize
      if end - begin != want: raise FileError(f"{path}: tensor {name!r} has {end - begin} bytes for shape {shape} ({want} expected)")
      if self.start + end > size:
        raise FileError(f"{path} is truncated: tensor {name!r} ends at byte {self.start + end} but the file has {size} bytes")
    self._mmap = np.memmap(path, dtype=np.uint8, mode="r") if size > self.start else np.zeros(0, np.uint8)

  def keys(self): return list(self.header)
  def shape(self, name): return tuple(self.header[name]["shape"])
  def stored_type(self, name): return self.header[name]["dtype"]

  def release(self, name):
    """Let the tensor's file pages go from this process (the OS keeps them in its page cache;
    a view of them faults them back in when used): after a check read every value at load."""
    mm = getattr(self._mmap, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise"): return
    begin, end = self.header[name]["data_offsets"]
    first = (self.start + begin) // mmap.PAGESIZE * mmap.PAGESIZE
    if end > begin: mm.madvise(mmap.MADV_DONTNEED, first, min(len(mm), self.start + end) - first)

  def get(self, name, start=None, stop=None):
    """The tensor as a NumPy array: a view of the file for F32/F16/ints, a float32 copy for BF16;
    with start, stop: only those rows of its first dim (a BF16 tensor's rows alone converted)."""
    info = self.header[name]
    begin, end = info["data_offsets"]
    arr = self._mmap[self.start + begin:self.start + end].view(self.DTYPES[info["dtype"]]).reshape(info["shape"])
    if start is not None: arr = arr[start:stop]
    if info["dtype"] == "BF16": arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr


class SafetensorsFolder:
  """All tensors of a model folder: model.safetensors, or the shards an index names."""
  def __init__(self, folder):
    single, index = os.path.join(folder, "model.safetensors"), os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(single):
      self.files = {single: SafetensorsFile(single)}
      self.where = {k: single for k in self.files[single].keys()}
    elif os.path.exists(index):
      weight_map = read_json(index, "a safetensors index")
      if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
        raise FileError(f"{index}: expected a JSON object with a \"weight_map\" of tensor names to files")
      self.files, self.where = {}, {}
      for name, shard in weight_map["weight_map"].items():
        p = os.path.join(folder, shard)
        if p not in self.files:
          if not os.path.exists(p): raise MissingFile(f"{index} names shard {shard}, which is missing (tensor {name!r})")
          self.files[p] = SafetensorsFile(p)
        if name not in self.files[p].header: raise FileError(f"{index} puts tensor {name!r} in {shard}, which does not hold it")
        self.where[name] = p
    else:
      found = [f for f in os.listdir(folder) if f.endswith((".bin", ".pt", ".pth"))]
      hint = f" (found {', '.join(found)}: PyTorch pickles are not read; convert them to safetensors)" if found else ""
      raise MissingFile(f"{folder}: no model.safetensors or model.safetensors.index.json{hint}")

  def keys(self): return list(self.where)
  def file(self, name): return self.where[name]
  def shape(self, name): return self.files[self.where[name]].shape(name)
  def stored_type(self, name): return self.files[self.where[name]].stored_type(name)
  def get(self, name): return self.files[self.where[name]].get(name)
  def get_rows(self, name, start, stop): return self.files[self.where[name]].get(name, start, stop)
  def stored_float32(self, name): return self.files[self.where[name]].header[name]["dtype"] == "F32"
  def release(self, name): self.files[self.where[name]].release(name)


def read_config(folder):
  path = os.path.join(folder, "config.json")
  if not os.path.isdir(folder): raise MissingFile(f"model folder {folder} does not exist")
  if not os.path.exists(path): raise MissingFile(f"{folder}: no config.json (an HF model folder needs one)")
  config = read_json(path, "a model config")
  if not isinstance(config, dict): raise FileError(f"{path}: expected a JSON object")
  return config


def check_weights_finite(arr, name, where):
  """FileError naming the tensor and its file unless every value of arr (a weight being
  loaded) is finite: a NaN or infinite weight would make every loss NaN."""
  bad = first_non_finite(arr)
  if bad is not None:
    index, value = np.unravel_index(bad, arr.shape), arr.reshape(-1)[bad]
    raise FileError(f"{where}: tensor {name!r} holds a non-finite value ({value} at index {tuple(int(i) for i in index)}): "
                    f"the weights are damaged, or were saved from a run that diverged")


# a vector (a norm, a bias) smaller than this is copied out of the file mapping: reading a few bytes
# of a mapped file maps the pages around them too (the page cache's large folios: 1-2 MB for each
# norm vector, measured here), so a model's norms and biases used in place cost far more memory
# than they hold (SmolLM2's 61 norms of its GGUF: 55 MB)
COPY_BELOW = 1 << 20


def to_tensor(arr, dtype=None):
  """A Tensor over a NumPy array that nothing else holds (a loader's file view or conversion),
  float32 by default; float16 storage when dtype is float16 (for matrices only: vectors such as
  norms and biases stay float32). No copy when the dtype matches, but for small vectors."""
  want = np.float16 if dtype is not None and dtypes.from_any(dtype) == dtypes.float16 and arr.ndim >= 2 else np.float32
  if arr.dtype != want: arr = arr.astype(want)
  elif arr.ndim < 2 and arr.nbytes < COPY_BELOW: arr = np.array(arr)   # a norm or a bias: out of the file mapping (COPY_BELOW)
  arr = arr.view()                # arrays here are fresh conversions or file views that only this Tensor will
  arr.flags.writeable = False     # hold: read-only, the backend keeps them as they are instead of copying
  return Tensor(arr)


def load_weights(model, source, where, transposed=(), dtype=None, convert=None):
  """Fill every parameter of `model` from `source` (keys(), shape(key), get(key), stored_type(key);
  raw(key) where it holds quantized blocks), with HF names. model.hf_name maps a key to a
  parameter name (None skips it); parameters whose name ends with one of `transposed` are stored
  (in, out) in the file. convert(name, array) may fix values up (rows of blocks' bytes too: a row
  permutation). dtype: the base dtype (minift/quant.py: keep, float32 (None), float16, q8_0,
  q4_0). Shapes are all checked before anything is read."""
  params = dict(model.named_parameters())
  plan, unexpected = {}, []
  for key in source.keys():
    name = model.hf_name(key)
    if name is None: continue
    if name == "lm_head.weight" and getattr(model, "lm_head", 0) is None: continue   # tied to the embedding
    if name not in params: unexpected.append(key); continue
    plan[name] = key
  file_of = lambda key: source.file(key) if hasattr(source, "file") else where
  if unexpected:
    raise FileError(f"{where}: unexpected tensor(s) for {type(model).__name__}: " + ", ".join(f"{k!r} in {file_of(k)}" for k in unexpected[:10]) +
                     (f" and {len(unexpected) - 10} more" if len(unexpected) > 10 else ""))
  missing = [n for n in params if n not in plan]
  if missing:
    raise FileError(f"{where}: missing tensor(s) for {type(model).__name__}: {', '.join(missing[:10])}" +
                     (f" and {len(missing) - 10} more" if len(missing) > 10 else ""))
  for name, key in plan.items():
    is_t = name.endswith(tuple(transposed))
    want = tuple(params[name].shape)[::-1] if is_t else tuple(params[name].shape)
    have = tuple(source.shape(key))
    if have != want:
      raise FileError(f"{file_of(key)}: tensor {key!r} has shape {have}, but the model ({type(model).__name__}"
                       f" from its config) expects {want}{' (Conv1D layout, in x out)' if is_t else ''}")
  storage = BaseStorage(dtype, quantizable(model))
  for name, key in plan.items():
    is_t = name.endswith(tuple(transposed))
    target = storage.target(name, source.stored_type(key), tuple(params[name].shape))
    if target.is_quantized: t = _quantized(source, name, key, target, convert, is_t, file_of(key))
    elif _load_in_pieces(model, source, name, key, target): continue
    else:
      arr = source.get(key)
      check_weights_finite(arr, key, file_of(key))
      if convert is not None: arr = convert(name, arr)
      t = to_tensor(arr, target)
      del arr
      if is_t: t = t.T
    if hasattr(source, "release"): source.release(key)   # the check read every page of it (a quantized view faults them back in)
    model.set_parameter(name, t)
    if active_sharder() is not None: active_sharder().adopt(model, name)   # paged as it loads
  storage.log(where)
  return model


def quantizable(model):
  """Names of the parameters that only matmuls and embedding lookups read: Linear weights and the
  token embedding table (not norms, biases, or position tables, which are added)."""
  from minift.nn import Linear
  names = {f"{path}.weight" for path, mod in model.named_modules() if isinstance(mod, Linear)}
  emb = getattr(model, "_embed_tokens", None)
  names |= {f"{path}.weight" for path, mod in model.named_modules() if mod is emb}
  return names


def _quantized(source, name, key, dtype, convert, transposed, where):
  """Parameter `name` as a quantized Tensor of dtype: the file's own blocks when it stores them in
  that type (memory-mapped; a converted row order is a copy), else its values quantized."""
  if hasattr(source, "raw") and quantized_dtype(source.stored_type(key)) == dtype:
    raw = source.raw(key)                              # (rows, row bytes), a view of the file
    shape = tuple(source.shape(key))
    bad = first_non_finite_block(raw, dtype)
    if bad is not None:
      raise FileError(f"{where}: tensor {key!r} holds a non-finite {dtype.name} scale (block {bad}): "
                      f"the weights are damaged, or were saved from a run that diverged")
    if convert is not None: raw = convert(name, raw)   # rows permuted (llama's Q and K), if at all
  elif convert is None and not transposed and hasattr(source, "get_rows"):   # a few million values at a time: no float32 copy of it all
    shape = tuple(source.shape(key))
    raw = np.empty((shape[0], dtype.nbytes(shape[1])), np.uint8)
    step = max(1, QUANTIZE_VALUES // shape[1])
    for r in range(0, shape[0], step):
      arr = source.get_rows(key, r, min(shape[0], r + step))
      check_weights_finite(arr, key, where)
      quantize(arr, dtype, raw[r:r + step])
      if hasattr(source, "release"): source.release(key)   # the rows read so far leave this process's memory as they go
  else:
    arr = source.get(key)
    check_weights_finite(arr, key, where)
    if convert is not None: arr = convert(name, arr)
    if transposed: arr = arr.T                         # (in, out) in the file: quantized along in, as the matmul reads it
    shape = arr.shape
    raw = quantize(arr, dtype)
  return Tensor.from_quantized(raw, shape, dtype)


def _load_in_pieces(model, source, name, key, target):
  """Under a sharder, a vocabulary table larger than its budget is read a row piece at a time
  (GGUF: dequantized piecewise; safetensors converted to float16 or from another dtype: rows
  of the file converted piecewise) and each piece paged as it comes, so the whole float32 table
  (671 MB for Gemma 3) never exists. A float32 safetensors table used as it is stays whole here
  (a file view costs nothing until read; split_large cuts it into views). Returns whether it did so. Vocabulary tables only: they are what outgrows a budget,
  and no conversion (the Q/K unpermutation, Gemma's norm offset) touches them."""
  from minift.nn import Embedding
  mod_path, _, attr = name.rpartition(".")
  mod = model.get_submodule(mod_path)
  sharder = active_sharder()
  if sharder is None or not hasattr(source, "get_rows") or not (isinstance(mod, Embedding) or name == "lm_head.weight"): return False
  shape = tuple(source.shape(key))
  if target == dtypes.float32 and getattr(source, "stored_float32", lambda k: False)(key): return False
  rows = sharder.rows_per_piece(shape, target.itemsize)
  if rows is None: return False
  pieces = []
  for start in range(0, shape[0], rows):
    arr = source.get_rows(key, start, min(shape[0], start + rows))
    check_weights_finite(arr, key, source.file(key))
    pieces.append(to_tensor(arr, target))
    del arr
    if hasattr(source, "release"): source.release(key)   # read for the check and the copy: its file pages can go
    sharder.manage(pieces[-1], f"{mod_path}.weight_pieces.{len(pieces) - 1}")
  delattr(mod, attr)
  mod.weight_pieces = pieces
  return True


def load_hf(folder, dtype=None, with_tokenizer=True):
  """(model, tokenizer or None) from an HF folder; the model class is picked by config.json's model_type."""
  from models import model_class, build
  config = read_config(folder)
  model_type = config.get("model_type")
  cls = model_class(model_type, f"{os.path.join(folder, 'config.json')} (model_type)")
  model = build(cls, config, os.path.join(folder, "config.json"))
  load_weights(model, SafetensorsFolder(folder), folder, transposed=cls.TRANSPOSED, dtype=dtype)
  tok = None
  if with_tokenizer:
    from minift.tokenizer import load_hf_tokenizer
    tok = load_hf_tokenizer(folder, config)
  return model, tok
