"""The corpus cleaning of glm_export/data/get_corpus.py on hand-written fortunes and reST (golden outputs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "get_corpus", Path(__file__).resolve().parents[1] / "glm_export" / "data" / "get_corpus.py"
)
get_corpus = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(get_corpus)


def test_fortune_loses_its_attribution_and_its_hard_wraps():
    text = (
        "Treaties are like roses and young girls --\n\tthey last while  they last.\n"
        "\t\t-- Charles DeGaulle,\n\t\tin a speech"
    )
    assert get_corpus.clean_fortune(text) == "Treaties are like roses and young girls -- they last while they last."


def test_fortune_paragraphs_stay_on_their_own_lines():
    text = "Q: What is the\ndifference?\n\nA: About  three\nweeks, they say."
    assert get_corpus.clean_fortune(text) == "Q: What is the difference?\nA: About three weeks, they say."


def test_a_dash_on_the_first_line_is_text_not_an_attribution():
    assert (
        get_corpus.clean_fortune("-- and so it goes, said the old man to the sea.")
        == "-- and so it goes, said the old man to the sea."
    )


@pytest.mark.parametrize(
    "text",
    [
        "  /\\_/\\\n ( o.o )\n  > ^ <  |||| ---- ==== ////",  # a picture
        "1 2 3 4 5 6 7 8 9 10 11 12",  # numbers
        "Too short.",
        "\t\t-- Nobody",  # only an attribution (kept as text: first line) but too short
    ],
)
def test_fortunes_that_are_not_prose_are_dropped(text):
    assert get_corpus.clean_fortune(text) == ""


def test_rst_prose_paragraphs_are_kept_with_markup_and_double_spaces_removed():
    rst = (
        "Title\n=====\n\nThe :func:`len` function returns the ``length`` of an object.  It is\n"
        "described in `the tutorial <tut.html>`_ and works on *any* sized container.\n\n"
        ".. note::\n\n   skipped\n\n    code block is skipped entirely here\n"
    )
    assert get_corpus.rst_to_prose(rst) == (
        "The len function returns the length of an object. It is described in "
        "the tutorial and works on any sized container."
    )
