"""MoLFAdamW against the float64 oracle of tests/optim_helpers.py (docs/method.md section 3), with
whichever backend "auto" picks here."""

import pytest

from tests.optim_helpers import CASES, case_id, check_against_oracle


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_float64_oracle(case):
    check_against_oracle(*case)
