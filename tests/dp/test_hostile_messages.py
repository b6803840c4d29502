"""Hostile names get a short, clear message: never a raw exception, never a 5,000-character
echo, control characters shown escaped."""

from __future__ import annotations

import pytest

from comfyui_dp_adapt.dp.embedding_file import validate_embedding_name
from comfyui_dp_adapt.dp.errors import InvalidParameterError
from comfyui_dp_adapt.dp.ledger import sanitize_ledger_name

HOSTILE = ["x" * 5000, "name\x00with-nul", "../" * 2000 + "escape", "\x1b[31mred"]


@pytest.mark.parametrize("check", [validate_embedding_name, sanitize_ledger_name])
@pytest.mark.parametrize("value", HOSTILE, ids=["long", "nul", "long-escape", "ansi"])
def test_hostile_names_get_a_short_clear_message(check, value):
    with pytest.raises(InvalidParameterError) as error:
        check(value)
    message = str(error.value)
    assert len(message) < 600
    assert "\x00" not in message and "\x1b" not in message
    assert "name" in message
