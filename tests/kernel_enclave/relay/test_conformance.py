"""The official kernel conformance suite (jupyter_kernel_test) against confnb-snp with the default display policy.

The kernel is started exactly as JupyterLab starts it: by kernelspec name, through ``confnb-provisioner``, which
launches the relay and executor, verifies the simulated evidence and connects over CurveZMQ. Every message the
suite reads is validated against the messaging spec's schemas, so this also checks that the relay's gate leaves
ordinary notebook output intact.
"""

from __future__ import annotations

import jupyter_kernel_test
import pytest

from confnb.provisioner.kernelspec import KERNEL_NAME

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("confnb_kernel_env")]
# jupyter_kernel_test reads its samples from class attributes, as lists.
# ruff: noqa: RUF012


class TestConfidentialKernelConformance(jupyter_kernel_test.KernelTests):
    kernel_name = KERNEL_NAME
    language_name = "python"
    file_extension = ".py"

    code_hello_world = "print('hello, world')"
    code_stderr = "import sys; print('test', file=sys.stderr)"
    completion_samples = [{"text": "zi", "matches": {"zip"}}]
    complete_code_samples = ["1", "print('hello, world')", "def f(x):\n  return x*2\n\n\n"]
    incomplete_code_samples = ["print('''hello", "def f(x):\n  x*2"]
    invalid_code_samples = ["import = 7q"]
    code_page_something = "zip?"
    code_generate_error = "raise ValueError('confnb conformance')"
    code_execute_result = [{"code": "6*7", "result": "42"}, {"code": "'confnb'", "result": "'confnb'"}]
    code_display_data = [
        {"code": "from IPython.display import HTML, display; display(HTML('<b>test</b>'))", "mime": "text/html"},
        {"code": "from IPython.display import Math, display; display(Math('\\\\frac{1}{2}'))", "mime": "text/latex"},
    ]
    code_history_pattern = "6*7*"
    supported_history_operations = ("tail", "search")
    code_inspect_sample = "zip"
    code_clear_output = "from IPython.display import clear_output; clear_output()"


class TestConfidentialKernelWelcome(jupyter_kernel_test.IopubWelcomeTests):
    kernel_name = KERNEL_NAME
    support_iopub_welcome = True
