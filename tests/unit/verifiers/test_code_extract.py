"""`type: code`: the program taken from a reply. (Programs run in the sandbox: tests/e2e/test_code_verifier.py.)"""

from __future__ import annotations

from sft_ray.verifiers.code import extract_program


def test_extract_program():
    assert extract_program("Here:\n```python\nprint(1)\n```\nand\n```py\nprint(2)\n```\n") == "print(2)\n"
    assert extract_program("```python\nx = 1\n```\n```text\noutput\n```") == "x = 1\n"  # the code, not its output
    assert extract_program("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # cut by the limit
    assert extract_program("print(3)") == "print(3)"
