"""Object-store errors reach the user as one line that says what went wrong: a URL whose
scheme has no filesystem is told so; a ValueError from reading what the store returned
is not mistaken for one."""

from __future__ import annotations

import pytest

from opt_ray.errors import UserError
from opt_ray.run_dir import store_errors


def test_unknown_scheme_is_named_as_such():
    from opt_ray.eval.loading import _locate_url

    with pytest.raises(UserError, match=r"checkpoint nosuch://bucket/run: no filesystem for this URL"):
        _locate_url("nosuch://bucket/run")


def test_a_value_error_from_the_data_is_not_called_a_missing_filesystem():
    with pytest.raises(UserError) as info:
        with store_errors("checkpoint s3://b/run", "a read"):
            int("not-a-step")
    msg = str(info.value)
    assert "no filesystem" not in msg
    assert msg.startswith("checkpoint s3://b/run: a read failed (ValueError: invalid literal")
