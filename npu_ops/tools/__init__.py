"""Command-line tools around the operators (none of the core modules imports them).

* `bench`, `bench_ep`: CPU speed against a dense dot and ragged_dot (`bench --ep`: expert
  parallel on simulated devices); `demo`: the fused op on an MoE shape.
* `aot`: every kernel compiled for compile-only TPU and GPU targets.
* `accelerator_check`: the kernels' tests on a real GPU / TPU, then their speed.
* `compile_time`: jit compile time of our ops vs the program a user would write instead.
* `api_reference`: docs/api.md from the docstrings.
"""


def positive_int(text: str) -> int:
  """argparse type: an int >= 1 (a count of rows, experts, repeats, devices)."""
  import argparse  # noqa: PLC0415
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
  if value < 1:
    raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
  return value
