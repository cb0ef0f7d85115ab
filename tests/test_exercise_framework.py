"""The exercise framework: a check says 'not done yet', 'wrong' (with what is wrong) or 'correct'."""

import torch

from qlora_tutor.exercises import base
from qlora_tutor.exercises.base import check, compare, expect, run


@check("double it")
def check_double(fn):
    x = torch.randn(3, 5)
    got = run(fn, x)
    expect(isinstance(got, torch.Tensor), f"return a tensor, got {type(got).__name__}")
    compare("result", got, 2 * x)


def test_untouched_todo_is_not_done_and_not_a_failure():
    def todo(x):
        raise NotImplementedError
    v = check_double(todo)
    assert v.status == base.NOT_DONE and not v and not v.done
    assert "TODO" in str(v)


def test_correct_answer_passes():
    v = check_double(lambda x: x * 2)
    assert v and v.status == base.DONE and str(v).startswith("✓")


def test_wrong_value_names_the_first_element_and_the_count():
    def off_by_one(x):
        y = 2 * x
        y[1, 2] += 1
        return y
    v = check_double(off_by_one)
    assert v.status == base.WRONG and "result[1, 2]" in v.message and "1 of 15 elements differ" in v.message


def test_wrong_shape_dtype_type_and_nan_are_named():
    assert "shape (5, 3)" in check_double(lambda x: (2 * x).T).message
    assert "dtype torch.float64" in check_double(lambda x: (2 * x).double()).message
    assert "expected a function" in check_double(3).message
    assert "NaN or Inf" in check_double(lambda x: 2 * x / 0 * 0).message
    assert "return a tensor, got list" in check_double(lambda x: [1]).message


def test_exception_in_learner_code_is_reported_with_its_type():
    v = check_double(lambda x: x @ x)
    assert v.status == base.WRONG and "RuntimeError" in v.message


def test_tolerance_and_integer_compare():
    compare("a", torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0 + 1e-7]), atol=1e-6)
    v = check("ints")(lambda: compare("codes", torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4])))()
    assert v.status == base.WRONG and "codes[2] is 3 but should be 4" in v.message
