"""Run several command lines of the tools in this one process, each as `python tools/T.py ARGS`
would run it (as __main__, with its own sys.argv and fresh stdout and stderr), and write what
each printed and its exit status as JSON. test_cli_errors.py uses it so that dozens of bad
command lines cost a few process starts rather than one each.

  python test/cli_driver.py CASES.json RESULTS.json     # CASES: [[tool, [args...]], ...]

A command line still running after CASE_TIMEOUT seconds is stopped with an exception (its
traceback then fails the case): a bad input must be refused early, not after the work.
"""
import contextlib, io, json, os, runpy, signal, sys, traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
CASE_TIMEOUT = 120


class CaseTimeout(Exception):
  pass


def _timeout(*_): raise CaseTimeout(f"still running after {CASE_TIMEOUT} s")


def run_one(tool, argv):
  out, err = io.StringIO(), io.StringIO()
  saved_argv, saved_path, saved_env = sys.argv, list(sys.path), dict(os.environ)
  sys.argv, sys.path[0:0] = [os.path.join(TOOLS, f"{tool}.py"), *argv], [TOOLS]
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      signal.signal(signal.SIGALRM, _timeout)
      signal.alarm(CASE_TIMEOUT)
      try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        status = 0
      except SystemExit as e:   # as the interpreter exits: a str code is printed, None is 0
        if isinstance(e.code, str): print(e.code, file=sys.stderr)
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
      except BaseException:     # what the interpreter would print for an uncaught exception
        traceback.print_exc()
        status = 1
  finally:
    signal.alarm(0)
    sys.argv, sys.path[:] = saved_argv, saved_path
    os.environ.clear(); os.environ.update(saved_env)
  return {"status": status, "stdout": out.getvalue(), "stderr": err.getvalue()}


if __name__ == "__main__":
  with open(sys.argv[1]) as f: cases = json.load(f)
  results = [run_one(tool, argv) for tool, argv in cases]
  with open(sys.argv[2], "w") as f: json.dump(results, f)
