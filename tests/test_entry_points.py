"""The demo, the benchmark, the notebooks and the README examples run (small shapes) and
check what they print. Marked slow (minutes of compiling): README's test command (and
.ci/run) runs them with the rest; `-m "not slow"` leaves them out."""

import contextlib
import importlib
import io
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from npu_ops.tools import bench, demo

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_runs(capsys):
  demo.main(["--m", "96", "--k", "64", "--n", "64", "--e", "4"])
  out = capsys.readouterr().out
  assert "output int8[96, 32]" in out and "ratio" in out
  rel = float(out.split("SwiGLU(x @ W): ")[1].split("%")[0])
  assert rel < 10  # int8 x, weights and output: a few percent


def test_aot_cases_alone_lists_the_case_names(capsys):
  """`python -m npu_ops.tools.aot --cases` lists the names to choose from (issue 32 item 15),
  compiling nothing."""
  from npu_ops.tools import aot  # noqa: PLC0415
  assert aot.main(["--cases"]) == []
  names = capsys.readouterr().out.splitlines()
  assert names == [c.name for c in aot.cases()] and "fused A8W8 m=4096 e=16" in names


@pytest.mark.slow
def test_bench_runs_every_path(tmp_path, capsys):
  rows = bench.main(["--m", "64", "--k", "32", "--n", "16", "--e", "4", "--repeats", "1",
                     "--out", str(tmp_path)])
  assert len(rows) == 4 and json.loads((tmp_path / "bench.json").read_text()) == rows
  for r in rows:
    for key in ("fused", "fused_static", "fused_list", "gmm", "gmm_list", "gmm_dots_floor",
                "gmm_bf16", "gmm_list_bf16", "tgmm_bf16", "gmm_f32", "gmm_list_f32", "tgmm_f32",
                "tgmm_floor_f32", "tgmm_floor_bf16"):
      assert r["ratio_" + key] > 0, key
    # the roofline: max(ops / R, touched weight bytes / B), from this run's measurements
    roof = r["roofline"]
    touched = sum(c > 0 for c in r["counts"]) * 32 * 16
    for dtype, tag, size in (("int8", "", 1), ("bfloat16", "_bf16", 2), ("float32", "_f32", 4)):
      expected = max(2 * 64 * 32 * 16 / roof["rate"][dtype], touched * size / roof["read"])
      np.testing.assert_allclose(r["t_roof" + tag], expected, rtol=1e-12)
    for key in ("fused", "fused_static", "fused_list", "gmm", "gmm_list"):
      np.testing.assert_allclose(r["roof_" + key], r["t_roof"] / r["t_" + key], rtol=1e-12)
    # cap: the roofline over one dot call per non-empty group plus the ops at R
    for dtype, tag in (("int8", ""), ("bfloat16", "_bf16"), ("float32", "_f32")):
      calls = (sum(c > 0 for c in r["counts"]) * roof["call"][dtype]
               + 2 * 64 * 32 * 16 / roof["rate"][dtype])
      np.testing.assert_allclose(r["cap" + tag], r["t_roof" + tag] / calls, rtol=1e-12)
    np.testing.assert_allclose(r["roof_gmm_f32"], r["t_roof_f32"] / r["t_gmm_f32"], rtol=1e-12)
    assert r["ragged_vs_fused"] > 0
    assert r["mem"] >= 1
    assert r["host"] == bench.host_kind()  # e.g. "AMD EPYC (AVX2)": figures stay comparable
  table = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("wrote")]
  assert any(" ragged " in line for line in table) and any(" r-fus " in line for line in table)
  assert any(" r-bfl " in line and " c-f32" in line for line in table)
  assert any("Roofline: R =" in line for line in table)
  assert any(line.startswith("The fused op with a static list took") for line in table)
  assert max(map(len, table)) < 100  # a terminal's width, legend included


@pytest.mark.slow
def test_bench_qat_runs(tmp_path, capsys):
  rows = bench.main(["--qat", "--m", "64", "--k", "32", "--n", "16", "--e", "4", "--groups",
                     "uniform", "--repeats", "1", "--out", str(tmp_path)])
  assert len(rows) == 1 and rows[0]["qat_step_over_float"] > 0
  assert json.loads((tmp_path / "bench_qat.json").read_text()) == rows
  assert "qat+bwd" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_ep_runs():
  """--ep needs a fresh process (the device count is fixed when JAX starts)."""
  out = subprocess.run(
      [sys.executable, "-m", "npu_ops.tools.bench", "--ep", "4", "--ep-tokens", "64", "--ep-shape",
       "32", "48", "8", "--ep-modes", "int8", "float", "--repeats", "1", "--no-ep-aot"],
      capture_output=True, text=True, check=True, env={**os.environ, "JAX_PLATFORMS": "cpu"},
      cwd=ROOT).stdout
  rows = {line.split("  ")[0]: line.split() for line in out.splitlines()
          if line.startswith(("int8 forward", "float train step"))}
  assert len(rows) == 2, out
  for cells in rows.values():
    one, ep, ratio, collectives, moved, ideal, times = map(float, cells[-7:])
    assert one > 0 and ep > 0 and collectives >= 2 and times >= 1, out  # MB: rounded


def test_bench_ep_says_when_jax_already_started():
  import jax
  jax.devices()  # this process's CPU backend has started with one device
  with pytest.raises(SystemExit, match="fresh process"):
    bench.main(["--ep", "4"])


@pytest.mark.parametrize("tool,argv,flag", [
    ("bench", ["--m", "0"], "--m"), ("bench", ["--ep", "0"], "--ep"),
    ("bench", ["--repeats", "-1"], "--repeats"), ("demo", ["--e", "0"], "--e"),
    ("compile_time", ["--repeats", "0"], "--repeats"),
    ("compile_time", ["--targets", "v7"], "--targets")])
def test_tools_refuse_counts_below_one_and_unknown_targets(tool, argv, flag, capsys):
  """Bad flags stop at the parser, naming the flag (they ran into ZeroDivisionError, inf
  times, a traceback, or `--ep 0` into the other benchmark)."""
  main = importlib.import_module(f"npu_ops.tools.{tool}").main
  with pytest.raises(SystemExit) as e:
    main(argv)
  assert e.value.code == 2 and f"argument {flag}" in capsys.readouterr().err


def test_group_counts_sum_to_m():
  rng = np.random.default_rng(0)
  for kind in ("uniform", "skewed", "one_group", "many_empty"):
    c = bench.group_counts(kind, 1000, 16, rng)
    assert c.sum() == 1000 and (c >= 0).all()


# Notebooks that run long enough for XLA:CPU's optimizations to pay (conftest turns them off):
# the QAT study's quick settings train for about 80 s of its 120 s, 25 s longer without them.
TRAINS = {"moe_qat.ipynb"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")))
def test_notebook_executes(name, monkeypatch, request):
  """Runs every cell in a fresh kernel (nbclient), at most 5 minutes a cell."""
  import nbclient
  import nbformat
  monkeypatch.setenv("MPLBACKEND", "Agg")
  if name in TRAINS:
    request.getfixturevalue("users_compiler")
  nb = nbformat.read(ROOT / "notebooks" / name, as_version=4)
  nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                          resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()


@pytest.mark.slow
@pytest.mark.parametrize("doc", ["README.md", "docs/performance.md", "docs/accelerators.md"])
def test_readme_examples_run(doc):
  import re
  blocks = re.findall(r"```python\n(.*?)```", (ROOT / doc).read_text(), re.S)
  assert blocks or doc == "docs/accelerators.md"
  for block in blocks:
    # a `print` followed by `# ...` comment lines: what it must print
    expected = re.findall(r"^print\(.*\n((?:# .*\n)+)", block, re.M)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
      exec(compile(block, doc, "exec"), {})
    for lines in expected:
      assert "\n".join(line[2:] for line in lines.splitlines()) in out.getvalue(), (
          lines, out.getvalue())


@pytest.mark.skipif(os.environ.get("NPU_OPS_TEST_COMPILATION_CACHE") == "0",
                    reason="the persistent compilation cache is turned off")
def test_the_suite_keeps_compiled_programs_for_its_next_run():
  """tests/conftest.py points JAX's persistent compilation cache at `.jax_cache/` (or
  JAX_COMPILATION_CACHE_DIR) for every program, however quick to compile: a program
  compiled here is on disk afterwards."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  where = pathlib.Path(os.environ["JAX_COMPILATION_CACHE_DIR"])
  assert jax.config.jax_compilation_cache_dir == str(where)
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
  salt = int(np.random.default_rng().integers(1 << 30))  # a program no earlier run compiled

  def probe(x):
    return x * 3 + salt
  probe.__name__ = f"cache_probe_{salt}"
  jax.jit(probe).lower(jnp.zeros((7,), jnp.int32)).compile()
  assert list(where.glob(f"jit_cache_probe_{salt}-*"))


def test_the_test_install_keeps_the_compilers_out_of_a_users_environment():
  """README's install for users pulls no accelerator plugin, and the test install (whose
  `aot` extra brings the compilers' plugins, noisy in every program on a CPU host) is made
  in a virtual environment of its own (issue 32 item 11)."""
  import re  # noqa: PLC0415
  readme = (ROOT / "README.md").read_text()
  bash = "\n".join(re.findall(r"```bash\n(.*?)```", readme, re.S))
  first_aot = bash.index('.[test,aot]')
  assert re.search(r"python -m venv \S+ && \. \S+/bin/activate", bash[:first_aot])
  assert re.search(r"^pip install -e \.\s", bash, re.M)  # the user's: no extra


def test_api_reference_is_current_and_complete():
  """docs/api.md is what `python -m npu_ops.tools.api_reference --write` writes, and names
  every public name of `npu_ops` (issue 32 item 13)."""
  import npu_ops
  from npu_ops.tools import api_reference
  text = api_reference.PATH.read_text()
  assert text == api_reference.render(), "run python -m npu_ops.tools.api_reference --write"
  public = [n for n in dir(npu_ops) if not n.startswith("_") and not isinstance(
      getattr(npu_ops, n), type(npu_ops))]
  missing = [n for n in public if f"`npu_ops.{n}" not in text]
  assert not missing, missing


def test_public_surface_is_the_documented_one():
  """The only modules under `npu_ops` a user meets are the documented ones (issue 32 item
  17): the internals live in `npu_ops._src`, and `npu_ops.gmm` is no longer a module that
  shadows megablox's `gmm` function."""
  import types  # noqa: PLC0415
  import npu_ops  # noqa: PLC0415
  import npu_ops.nn, npu_ops.perf, npu_ops.recipes, npu_ops.tools  # noqa: F401, E401, PLC0415
  from npu_ops.tools import api_reference  # noqa: PLC0415
  documented = {name for name, _ in api_reference.SECTIONS} | {"npu_ops.tools"}
  modules = {f"npu_ops.{n}" for n in dir(npu_ops)
             if not n.startswith("_") and isinstance(getattr(npu_ops, n), types.ModuleType)}
  assert modules == documented - {"npu_ops"}, modules
  for internal in ("gmm", "row_blocks", "backend", "operands", "groups", "qat"):
    assert not hasattr(npu_ops, internal), internal


def test_v2_is_a_facade():
  """`npu_grouped_matmul_swiglu_quant_v2` decodes torch_npu's arguments and calls a core op
  (issue 33 item 2): at most 60 lines of code, its docstring aside."""
  import ast  # noqa: PLC0415
  import inspect  # noqa: PLC0415
  import textwrap  # noqa: PLC0415
  from npu_ops._src import gmm_swiglu_quant  # noqa: PLC0415
  fn = ast.parse(textwrap.dedent(inspect.getsource(
      gmm_swiglu_quant.npu_grouped_matmul_swiglu_quant_v2))).body[0]
  doc = fn.body[0]  # the docstring's lines do not count
  lines = (fn.end_lineno - fn.lineno + 1) - (doc.end_lineno - doc.lineno + 1)
  assert lines <= 60, lines


def test_dependencies_declare_floors_not_pins():
  """Installing npu_ops beside a newer JAX keeps it (issue 32 item 16): jax and jaxlib have
  floors at the version CI tests, not exact pins."""
  import pathlib  # noqa: PLC0415
  import tomllib  # noqa: PLC0415
  project = tomllib.loads((pathlib.Path(__file__).parents[1] / "pyproject.toml").read_text())
  deps = project["project"]["dependencies"]
  assert "jax>=0.10.2" in deps and "jaxlib>=0.10.2" in deps
  extras = [d for ds in project["project"]["optional-dependencies"].values() for d in ds]
  assert not any(d.startswith(("jax==", "jaxlib==", "jax[")) and "==" in d
                 for d in deps + extras), deps + extras


def test_a_jax_without_pallas_triton_runs_xla_on_gpus(monkeypatch):
  """JAX deprecates Pallas' Triton backend from 0.11 (issue 32 item 16): where it is gone,
  the GPU kernels declare no case (None runs XLA on GPUs) and asking for them by name says
  why."""
  from pallas_kernels import common, gpu  # noqa: PLC0415
  from npu_ops._src import backend  # noqa: PLC0415
  problem = common.Problem(op="gmm", m=64, k=32, n=16, groups=2, dtype="float32")
  assert gpu.supports(problem) is None
  monkeypatch.setattr(gpu, "pltr", None)
  assert gpu.supports(problem) == gpu.NO_TRITON
  with pytest.raises(NotImplementedError, match="no Pallas Triton backend"):
    backend.resolve("pallas_gpu", problem)
