"""The API reference, generated from the docstrings: `python -m npu_ops.tools.api_reference
[--write]` prints `docs/api.md` (or writes it). `tests/test_entry_points.py` checks that the
file is what this prints, so it never lags the code.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import pathlib
import sys

# (module, its public names in the order a reader meets them, or None for every name
# the module re-exports without a leading underscore)
SECTIONS = (
    ("npu_ops", None),
    ("npu_ops.nn", ("MoEMLP", "LinearA8W8Quant")),
    ("npu_ops.moe", ("moe_mlp", "MoEWeights", "MoEOutput", "Dispatch")),
    ("npu_ops.recipes", ("Recipe", "RECIPES", "get")),
    ("npu_ops.perf", ("predict", "Prediction", "KernelCost")),
)
PATH = pathlib.Path(__file__).resolve().parents[2] / "docs" / "api.md"


def public_names(module_name: str) -> list[str]:
  """The names a user imports from `module_name`: its explicit re-exports (`import a as a`)
  and its own public definitions."""
  module = importlib.import_module(module_name)
  names = []
  for name, value in vars(module).items():
    if name.startswith("_") or inspect.ismodule(value):
      continue
    if callable(value) or isinstance(value, (int, str, tuple)):
      names.append(name)
  return sorted(names, key=str.lower)


def _default(v) -> str:
  return f"jnp.{v.__name__}" if inspect.isclass(v) and v.__module__.startswith("jax") else repr(v)


def _signature(value) -> str:
  """The parameters as a call spells them: no annotations, a class's from its __init__."""
  try:
    sig = inspect.signature(value)
    if inspect.isclass(value) and {p.kind for p in sig.parameters.values()} >= {
        inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD}:
      sig = inspect.signature(value.__init__)  # a Flax module's metaclass hides it
  except (TypeError, ValueError):
    return ""
  params, star = [], False
  for p in sig.parameters.values():
    if p.name == "self" or p.name in ("args", "kwargs") and inspect.isclass(value) and (
        p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD)):
      continue
    if p.kind == p.KEYWORD_ONLY and not star:
      params.append("*")
      star = True
    prefix = {p.VAR_POSITIONAL: "*", p.VAR_KEYWORD: "**"}.get(p.kind, "")
    star = star or p.kind == p.VAR_POSITIONAL
    params.append(prefix + p.name + ("" if p.default is p.empty else f"={_default(p.default)}"))
  return f"({', '.join(params)})"


def _entry(module_name: str, name: str, value) -> list[str]:
  doc = inspect.getdoc(value) if (callable(value) or inspect.isclass(value)) else None
  if doc is None:  # a constant
    return [f"### `{module_name}.{name}` = `{value!r}`", ""]
  kind = "class " if inspect.isclass(value) else ""
  return [f"### {kind}`{module_name}.{name}{_signature(value)}`", "", "```text", doc, "```", ""]


def render() -> str:
  lines = ["# npu_ops API reference", "",
           "Generated from the docstrings by `python -m npu_ops.tools.api_reference --write`",
           "(a test checks it is current). Semantics sections (\"semantics B.1.3\") are in",
           "[semantics.md](semantics.md); README has the guide.", ""]
  for module_name, names in SECTIONS:
    module = importlib.import_module(module_name)
    names = names or public_names(module_name)
    lines += [f"## `{module_name}`", "", ", ".join(f"`{n}`" for n in names), ""]
    for name in names:
      lines += _entry(module_name, name, getattr(module, name))
  return "\n".join(lines).rstrip() + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--write", action="store_true", help=f"write {PATH} instead of printing")
  a = p.parse_args(argv)
  text = render()
  if a.write:
    PATH.write_text(text)
  else:
    sys.stdout.write(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
