"""Errors caused by the user's files, flags or machine, and how every tool reports them.

Library code raises a UserError whose message names the file or flag and what was expected:
  * UsageError: a flag's value (exit status 2);
  * FileError: a file that is not what it should be: corrupt, truncated, of the wrong kind or
    for another model (also a ValueError);
  * MissingFile: a file or folder that is not there (also a FileNotFoundError).
Each tool's `if __name__ == "__main__":` calls `run(main)`, which prints such an error, a full,
read-only or too-small disk (OSError ENOSPC, EDQUOT, EFBIG, EROFS, EACCES, EPERM) and running out
of memory as one line `error: <message>` on stderr and exits with status 2 (UsageError) or 1.
Anything else is a bug and keeps its traceback; DEBUG=1 shows the traceback of user errors too.
Flags are range-checked while they are parsed (ArgumentParser, integer(), number()): an
argparse error is the same one line, with status 2.
"""
import argparse, contextlib, errno, json, math, os, re, sys


class UserError(Exception):
  """An error in what the user gave (a file, a flag) or in the machine, not in minift."""
  status = 1


class UsageError(UserError):
  """A flag's value is out of range or does not fit the model or data."""
  status = 2


class FileError(UserError, ValueError):
  """A file exists but is not what it should be (corrupt, truncated, another kind or model)."""


class MissingFile(UserError, FileNotFoundError):
  """A file or folder the user named, or one a model folder needs, is not there."""


# errors of the machine rather than of minift: a full disk, a file-size limit, no permission
MACHINE_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up", errno.EFBIG: "the file is too large for this file system or limit",
                  errno.EROFS: "the file system is read-only", errno.EACCES: "no permission", errno.EPERM: "not permitted"}


def read_json(path, what="JSON"):
  """json.load of path; MissingFile or FileError naming the file and what it should be."""
  try:
    with open(path, "rb") as f: return json.loads(f.read().decode("utf-8"))
  except FileNotFoundError:
    raise MissingFile(f"{path}: no such file (expected {what})") from None
  except UnicodeDecodeError as e:
    raise FileError(f"{path}: not UTF-8 text (bad byte at offset {e.start}); expected {what}") from None
  except json.JSONDecodeError as e:
    raise FileError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); expected {what}") from None


def name_file(e, path):
  """A write error from inside a library (a full disk) often names no file: name the one being
  written, so that the line the user sees says where."""
  if isinstance(e, OSError) and e.filename is None: e.filename = path


@contextlib.contextmanager
def writing(path):
  """with writing(p): ... -- an OSError inside names p if it names no file."""
  try:
    yield
  except OSError as e:
    name_file(e, path)
    raise


def check_output(path, flag):
  """UsageError naming flag unless a file can be created at path (its folder exists and is
  writable): checked before anything slow runs, not after."""
  folder = os.path.dirname(os.path.abspath(path))
  if os.path.isdir(path): raise UsageError(f"{flag} {path}: a folder, expected a file name")
  if not os.path.isdir(folder): raise UsageError(f"{flag} {path}: the folder {folder} does not exist")
  if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
    raise UsageError(f"{flag} {path}: cannot write there (no permission)")


def debug():
  """DEBUG=1 (or more) in the environment: show the traceback of user errors too."""
  try: return int(os.environ.get("DEBUG", "0") or 0) >= 1
  except ValueError: return False


def message_of(e):
  """The one line `run` prints for e, or None when e is not the user's or the machine's."""
  if isinstance(e, UserError): return str(e)
  if isinstance(e, OSError) and e.errno in MACHINE_ERRNOS:
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or os.strerror(e.errno)} ({MACHINE_ERRNOS[e.errno]})"
  if isinstance(e, MemoryError):
    return f"out of memory{f' ({e})' if str(e) else ''}; a smaller batch, sequence or model, or a memory budget (--shard_budget_mb) needs less"
  return None


def run(main, *args):
  """main(*args), as a tool's entry point: a user's or machine's error becomes one line
  `error: ...` on stderr and exit status 2 (UsageError) or 1; other exceptions propagate."""
  try:
    return main(*args)
  except Exception as e:
    text = message_of(e)
    if text is None or debug(): raise
    print(f"error: {' '.join(text.split())}", file=sys.stderr, flush=True)   # one line, whatever the message held
    sys.exit(getattr(e, "status", 1))


# ---- flags

class ArgumentParser(argparse.ArgumentParser):
  """argparse's parser whose errors are one line `error: --flag ...` (no usage block), exit status 2."""

  def error(self, message):
    m = re.fullmatch(r"argument ([^:/\s]+)(?:/\S+)?: (.*)", message, re.S)
    if m:
      flag, text = m.groups()
      bad = re.fullmatch(r"invalid (\w+) value: (.*)", text, re.S)
      if bad: text = f"must be {'an integer' if bad[1] == 'int' else 'a number'}, got {bad[2]}"
      message = f"{flag} {text}" if text.startswith("must") else f"{flag}: {text}"
    self.exit(2, f"error: {' '.join(message.split())} (see --help)\n")


def integer(low=None, high=None):
  """An argparse type: an integer in [low, high] (either may be None: unbounded)."""
  def parse(text):
    try: value = int(text)
    except ValueError: raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if (low is not None and value < low) or (high is not None and value > high):
      bound = f"at least {low}" if high is None else f"at most {high}" if low is None else f"an integer in [{low}, {high}]"
      raise argparse.ArgumentTypeError(f"must be {bound}, got {value}")
    return value
  return parse


def number(low=None, high=None, low_open=False, high_open=False):
  """An argparse type: a finite float in the interval from low to high (open ends excluded)."""
  def parse(text):
    try: value = float(text)
    except ValueError: raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    inside = math.isfinite(value) and (low is None or (value > low if low_open else value >= low)) and \
      (high is None or (value < high if high_open else value <= high))
    if not inside: raise argparse.ArgumentTypeError(f"must be {interval(low, high, low_open, high_open)}, got {text}")
    return value
  return parse


def interval(low, high, low_open=False, high_open=False):
  """'a finite number >= 0', 'a positive number', 'in [0, 1)' ..."""
  if high is None and low == 0 and low_open: return "a positive number"
  if high is None: return "a finite number" + ("" if low is None else f" {'>' if low_open else '>='} {low:g}")
  return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
