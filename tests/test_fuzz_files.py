"""The file fuzzer (tests/fuzz_files.py) in the default run: a bounded share of cases per format, derandomized so
every run tries the same ones; `python tests/fuzz_files.py --cases 10000` runs many more."""

from __future__ import annotations

from collections import Counter

import pytest

import fuzz_files

CASES = 25


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return fuzz_files.build(tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("fmt", sorted(fuzz_files.FORMATS))
def test_every_mutation_loads_or_is_refused_naming_the_file(fmt, built):
    counts: Counter = Counter()
    fuzz_files.fuzz(fmt, built, CASES, 0, counts)
    assert counts[(fmt, "loaded")] + counts[(fmt, "refused")] == CASES
    assert counts[(fmt, "refused")] > 0  # the mutations do reach the checks
