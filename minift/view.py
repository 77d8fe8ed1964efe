"""A View maps an index in a tensor's shape to an element of its base buffer.

shape, strides (elements), offset, and an optional mask: a box of valid index ranges per
dim, outside which the value reads as zero (what pad makes). Every movement op is a change of
view; when a view cannot express an op (e.g. merging dims of a transposed view) the op returns
None and the caller inserts a copy kernel.
"""
import functools
from dataclasses import dataclass
from minift.helpers import prod, strides_for


@functools.lru_cache(maxsize=1 << 14)   # tuples of ints: a cheap key; models reshape the same few shapes in every layer
def _reshape_strides(old_shape, old_strides, new_shape):
  """Strides that give new_shape over the same memory as (old_shape, old_strides), or None."""
  olds = [(s, st) for s, st in zip(old_shape, old_strides) if s != 1]
  new_strides = [0] * len(new_shape)
  oi = ni = 0
  while ni < len(new_shape) and oi < len(olds):
    new_prod, old_prod = new_shape[ni], olds[oi][0]
    nj, oj = ni + 1, oi + 1
    while new_prod != old_prod:
      if new_prod < old_prod:
        new_prod *= new_shape[nj]; nj += 1
      else:
        old_prod *= olds[oj][0]; oj += 1
    for k in range(oi, oj - 1):   # the old dims of one group must be mergeable
      if olds[k][1] != olds[k + 1][1] * olds[k + 1][0]: return None
    new_strides[nj - 1] = olds[oj - 1][1]
    for k in range(nj - 1, ni, -1): new_strides[k - 1] = new_strides[k] * new_shape[k]
    ni, oi = nj, oj
  return tuple(st if s != 1 else 0 for s, st in zip(new_shape, new_strides))


@dataclass(frozen=True)
class View:
  shape: tuple
  strides: tuple
  offset: int = 0
  mask: tuple = None    # ((lo, hi), ...) per dim, or None when everything is valid

  @staticmethod
  def contiguous(shape):
    return View(tuple(shape), strides_for(shape), 0, None)

  @property
  def numel(self): return prod(self.shape)

  def is_contiguous(self):
    return self.mask is None and self.offset == 0 and self.strides == strides_for(self.shape)

  def _norm_mask(self, mask, shape):
    if mask is None: return None
    mask = tuple((max(0, lo), min(n, hi)) if hi > lo else (0, 0) for (lo, hi), n in zip(mask, shape))
    if all(lo == 0 and hi == n for (lo, hi), n in zip(mask, shape)): return None
    return mask

  def reshape(self, new_shape):
    new_shape = tuple(new_shape)
    if new_shape == self.shape: return self
    if prod(new_shape) == 0: return View.contiguous(new_shape)
    if self.mask is not None:
      # only adding or removing size-1 dims keeps a masked view expressible
      if [s for s in self.shape if s != 1] != [s for s in new_shape if s != 1]: return None
      if any(m != (0, 1) for s, m in zip(self.shape, self.mask) if s == 1): return None
      kept = [(st, m) for s, st, m in zip(self.shape, self.strides, self.mask) if s != 1]
      strides, mask, i = [], [], 0
      for s in new_shape:
        if s == 1: strides.append(0); mask.append((0, 1))
        else: strides.append(kept[i][0]); mask.append(kept[i][1]); i += 1
      return View(new_shape, tuple(strides), self.offset, tuple(mask))
    strides = _reshape_strides(self.shape, self.strides, new_shape)
    return None if strides is None else View(new_shape, strides, self.offset, None)

  def permute(self, order):
    return View(tuple(self.shape[i] for i in order), tuple(self.strides[i] for i in order), self.offset,
                None if self.mask is None else tuple(self.mask[i] for i in order))

  def expand(self, new_shape):
    strides = tuple(0 if s != n else st for s, n, st in zip(self.shape, new_shape, self.strides))
    mask = None
    if self.mask is not None:
      mask = tuple(m if s == n else ((0, n) if m != (0, 0) else (0, 0)) for s, n, m in zip(self.shape, new_shape, self.mask))
    return View(tuple(new_shape), strides, self.offset, mask)

  def pad(self, pads):
    if all(b == 0 and a == 0 for b, a in pads): return self
    shape = tuple(s + b + a for s, (b, a) in zip(self.shape, pads))
    old = self.mask or tuple((0, s) for s in self.shape)
    mask = tuple((lo + b, hi + b) for (lo, hi), (b, _) in zip(old, pads))
    offset = self.offset - sum(b * st for (b, _), st in zip(pads, self.strides))
    return View(shape, self.strides, offset, self._norm_mask(mask, shape))

  def shrink(self, arg):
    if all(b == 0 and e == s for (b, e), s in zip(arg, self.shape)): return self
    shape = tuple(e - b for b, e in arg)
    offset = self.offset + sum(b * st for (b, _), st in zip(arg, self.strides))
    mask = None
    if self.mask is not None:
      mask = self._norm_mask(tuple((lo - b, hi - b) for (lo, hi), (b, _) in zip(self.mask, arg)), shape)
    return View(shape, tuple(st if s != 1 else 0 for s, st in zip(shape, self.strides)), offset, mask)

  def flip(self, axes):
    offset = self.offset + sum((self.shape[a] - 1) * self.strides[a] for a in axes)
    strides = tuple(-st if i in axes else st for i, st in enumerate(self.strides))
    mask = None
    if self.mask is not None:
      mask = tuple((self.shape[i] - hi, self.shape[i] - lo) if i in axes else (lo, hi) for i, (lo, hi) in enumerate(self.mask))
    return View(self.shape, strides, offset, mask)

  def apply(self, kind, arg):
    return getattr(self, kind)(arg)
