"""Checks for the notebooks' write-it-yourself exercises: one module per notebook, one framework (`base`).

A learner fills in a function marked TODO; the check cell after it calls the matching `check_...` function,
which runs the learner's code on fresh inputs, compares it with the library (this package, bitsandbytes or
PEFT) and says in plain words what is wrong. An untouched TODO reports "not done yet" without failing.
"""

from .base import Verdict, check, compare, expect, run, wrong

__all__ = ["Verdict", "check", "compare", "expect", "run", "wrong"]
