"""Command-line tools around the operators (none of the core modules imports them).

* `accelerator_check`: the kernels' tests on a real GPU / TPU, then their speed.
* `compile_time`: jit compile time of our ops vs the program a user would write instead.
"""
