"""The mutation check (issue 34, item 7) in the slow set: every mutant of
`mutation_check.MUTANTS` must make its targeted tests fail."""

import pytest

import mutation_check


@pytest.mark.slow
@pytest.mark.parametrize("mutant", mutation_check.MUTANTS, ids=lambda m: m.name)
def test_mutant_is_killed(mutant):
  name, rc, secs, last = mutation_check.run(mutant)
  assert rc == 1, f"{name} survived (pytest exit {rc} after {secs:.0f}s): {last}"
