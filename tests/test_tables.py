"""The one Markdown table writer: the layout docs/ holds, and a row that does not fit refused."""

from __future__ import annotations

import pytest

from inpaint.tables import markdown


def test_a_table_is_a_header_a_rule_and_a_line_a_row():
    table = markdown(["method", "dice"], [["model", "0.6031"], ["telea", "0.5213"]])
    assert table == "| method | dice |\n|---|---|\n| model | 0.6031 |\n| telea | 0.5213 |"


def test_a_table_of_no_rows_is_its_header():
    assert markdown(["a", "b"], []) == "| a | b |\n|---|---|"


def test_a_row_of_another_length_is_refused():
    with pytest.raises(ValueError, match="a row of 1 cells under a header of 2"):
        markdown(["a", "b"], [["1", "2"], ["3"]])
