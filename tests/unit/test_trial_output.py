"""What a reload makes of the trial run's output: `opa eval --format raw` prints the first
expression's `true`, then the policy's list of failures as JSON."""

from __future__ import annotations

import pytest

from agov.bundle import Trial, _refuse_trial_failures
from agov.errors import PolicyError

TRIAL = Trial("a chunk", "agov/revalidation/results", lambda _hash: None, 30, failures_rule="agov/x/failures")


def test_no_failures_passes() -> None:
    _refuse_trial_failures("the trial", "true []\n", TRIAL)


def test_one_failure_is_named() -> None:
    with pytest.raises(PolicyError) as refused:
        _refuse_trial_failures("the trial", 'true ["agent \\"a\\": wrong"]\n', TRIAL)
    assert refused.value.message == (
        'the trial failed: the policy\'s own check (agov/x/failures) found 1 problem:\n- agent "a": wrong'
    )


@pytest.mark.parametrize(
    "out", ["", "true", "false []", "true [", 'true {"a": 1}', "true null", "[] true"], ids=repr
)
def test_output_agov_cannot_read_refuses(out: str) -> None:
    with pytest.raises(PolicyError, match="gave output agov cannot read"):
        _refuse_trial_failures("the trial", out, TRIAL)
