"""The notebook checks of ``confnb demo --headless``: what makes an executed example notebook pass or fail."""

from __future__ import annotations

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output

from confnb.demo.notebooks import check

REFUSAL = (
    "PolicyViolation: the aggregate is computed from fewer than 10 records of the dataset "
    "[rule release.min_group_size of 'admissions']\n"
)


def _executed(*cells: nbformat.NotebookNode) -> nbformat.NotebookNode:
    return new_notebook(cells=[new_markdown_cell("# title"), *cells])


def _refused(text: str) -> nbformat.NotebookNode:
    cell = new_code_cell("...", outputs=[new_output("stream", name="stdout", text=text)])
    cell.metadata["tags"] = ["refused-leak"]
    return cell


def _shown(text: str, expect: list[str] | None = None, absent: list[str] | None = None) -> nbformat.NotebookNode:
    cell = new_code_cell("...", outputs=[new_output("execute_result", data={"text/plain": text}, execution_count=1)])
    cell.metadata["confnb"] = {"expect": expect or [], "absent": absent or []}
    return cell


def test_a_notebook_that_shows_what_it_explains_passes():
    outcome = check(_executed(_shown("basic 1169", ["1169"], ["platinum"]), _refused(REFUSAL)), "ok.ipynb")
    assert outcome.ok, outcome.problems
    assert (outcome.cells, outcome.refused_leaks) == (2, 1)


def test_a_refused_leak_cell_must_show_the_policy_rule():
    outcome = check(_executed(_refused("nothing happened\n")), "leak.ipynb")
    assert not outcome.ok
    assert "cell 1 should show a refused leak" in outcome.problems[0]


def test_expected_and_absent_values_are_checked():
    outcome = check(_executed(_shown("basic 1169\nplatinum 15", ["premium"], ["platinum"])), "values.ipynb")
    assert outcome.problems == [
        "cell 1: expected 'premium' in its output",
        "cell 1: 'platinum' must not be in its output",
    ]


def test_an_error_or_a_gate_notice_fails_the_notebook():
    error = new_code_cell("...", outputs=[new_output("error", ename="VaultError", evalue="boom", traceback=[])])
    notice = new_code_cell(
        "...",
        outputs=[
            new_output(
                "stream",
                name="stderr",
                text="[confnb] output withheld by the display policy (display.mime): none of its MIME types\n",
            )
        ],
    )
    outcome = check(_executed(error, notice), "broken.ipynb")
    assert outcome.problems[0] == "cell 1 raised VaultError: boom"
    assert "the display gate withheld output" in outcome.problems[1]


def _uncaught(ename: str, evalue: str, tags: list[str]) -> nbformat.NotebookNode:
    cell = new_code_cell("...", outputs=[new_output("error", ename=ename, evalue=evalue, traceback=[])])
    cell.metadata["tags"] = tags
    return cell


def test_an_uncaught_refusal_passes_where_the_cell_says_it_raises():
    rule = "[rule release.min_group_size of 'admissions']"
    outcome = check(_executed(_uncaught("PolicyViolation", rule, ["refused-leak", "raises-exception"])), "ok.ipynb")
    assert outcome.ok, outcome.problems
    assert outcome.refused_leaks == 1


def test_an_uncaught_error_fails_unless_it_is_the_refusal_the_cell_announces():
    rule = "[rule release.min_group_size of 'admissions']"
    cases = [
        _uncaught("PolicyViolation", rule, ["refused-leak"]),  # not announced as raising
        _uncaught("PolicyViolation", rule, ["raises-exception"]),  # not a refused leak
        _uncaught("VaultError", rule, ["refused-leak", "raises-exception"]),  # another error
        _uncaught("PolicyViolation", "", ["refused-leak", "raises-exception"]),  # no rule named (redacted)
    ]
    for cell in cases:
        outcome = check(_executed(cell), "broken.ipynb")
        assert outcome.problems and outcome.problems[0].startswith("cell 1 raised"), cell.metadata
