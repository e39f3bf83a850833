"""errors.py: one tree, and amending an error makes a new one raised from the first."""

from __future__ import annotations

import pytest

from kwasm_py.errors import KubeError, KwasmError, VerifyError


def test_amended_is_a_new_error_of_the_same_kind():
    """The amended error keeps kind, hint and fields; the original keeps its message."""
    first = KubeError("patch node n1: 500", hint="retry", status=500)
    new = first.amended("patch node n1: 500; gave up", step="label")
    assert type(new) is KubeError and new is not first
    assert (new.message, new.hint, new.status, new.step) == (
        "patch node n1: 500; gave up",
        "retry",
        500,
        "label",
    )
    assert str(new) == new.message and new.args == (new.message,)
    assert first.message == "patch node n1: 500" and first.step == ""


def test_raised_from_the_original():
    """Raising an amended error `from` the original chains it as the cause."""
    with pytest.raises(VerifyError) as caught:
        try:
            raise VerifyError("not listed")
        except VerifyError as err:
            raise err.amended("verify: not listed; rolled back") from err
    assert isinstance(caught.value.__cause__, VerifyError)
    assert caught.value.__cause__.message == "not listed"
    assert isinstance(caught.value, KwasmError)
