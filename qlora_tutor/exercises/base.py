"""The framework every exercise check uses: run the learner's code, compare with a reference, explain the gap.

    @check("NF4 levels")
    def check_levels(fn):
        got = run(fn)                      # NotImplementedError (the untouched TODO) -> "not done yet"
        expect(got.shape == (16,), f"...")  # a failed expectation -> "wrong: ..."
        compare("levels", got, reference)  # names shape, dtype, NaN, or the first wrong element

A check returns a `Verdict` (true only when correct) and never raises for a learner's mistake, so a notebook
whose exercises are not done yet still runs to the end.
"""

from __future__ import annotations

import functools
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

DONE, NOT_DONE, WRONG = "correct", "not done yet", "wrong"


@dataclass(frozen=True)
class Verdict:
    """The outcome of one check: `status` is 'correct', 'not done yet' or 'wrong'; `message` says why."""

    title: str
    status: str
    message: str

    def __bool__(self) -> bool:
        return self.status == DONE

    @property
    def done(self) -> bool:
        return self.status != NOT_DONE

    def __str__(self) -> str:
        mark = {DONE: "✓", NOT_DONE: "…", WRONG: "✗"}[self.status]
        return f"{mark} {self.title}: {self.status}" + (f" — {self.message}" if self.message else "")

    __repr__ = __str__  # a notebook shows the verdict as the check cell's output


class _NotDone(Exception):
    pass


class _Wrong(Exception):
    pass


def wrong(message: str) -> None:
    """Stop the check: the answer is wrong, for the reason given (in words a learner understands)."""
    raise _Wrong(message)


def expect(condition: Any, message: str) -> None:
    """`wrong(message)` unless `condition` holds."""
    if not condition:
        raise _Wrong(message)


def run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call the learner's function; an untouched TODO (NotImplementedError) means 'not done yet', any other
    exception is reported as wrong, with its type, message and the line of the learner's code it came from."""
    if not callable(fn):
        wrong(f"expected a function, got {type(fn).__name__}: pass the function itself, without calling it")
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise _NotDone() from None
    except (_Wrong, _NotDone):
        raise
    except Exception as err:  # the learner's bug: say what it was and where
        frames = traceback.extract_tb(err.__traceback__)
        where = next((f for f in reversed(frames) if f.filename.startswith("<") or "ipykernel" in f.filename), None)
        line = f" (line {where.lineno}: {where.line.strip()})" if where and where.line else ""
        wrong(f"your code raised {type(err).__name__}: {err}{line}")


def _index(flat_index: int, shape: torch.Size) -> str:
    idx = []
    for size in reversed(shape):
        idx.append(flat_index % size)
        flat_index //= size
    return "[" + ", ".join(map(str, reversed(idx))) + "]"


def compare(name: str, got: Any, want: torch.Tensor, *, atol: float = 0.0, rtol: float = 0.0,
            check_dtype: bool = True) -> None:
    """Raise a 'wrong' verdict unless `got` equals `want` (exactly, or within atol + rtol·|want|).

    The message names the first problem a learner should fix: not a tensor, the shape, the dtype, NaN/Inf
    values, then the first differing element (with its index) and how many differ.
    """
    if not isinstance(got, torch.Tensor):
        wrong(f"{name} should be a torch.Tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(want.shape):
        wrong(f"{name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if check_dtype and got.dtype != want.dtype:
        wrong(f"{name} has dtype {got.dtype}, expected {want.dtype}")
    a, b = got.detach().cpu(), want.detach().cpu()
    if a.is_floating_point() and not torch.isfinite(a).all() and torch.isfinite(b).all():
        bad = int((~torch.isfinite(a)).reshape(-1).nonzero()[0])
        wrong(f"{name} contains NaN or Inf, first at {_index(bad, a.shape)}")
    a64, b64 = a.to(torch.float64).reshape(-1), b.to(torch.float64).reshape(-1)
    if a.is_floating_point() or b.is_floating_point():
        off = (a64 - b64).abs() > atol + rtol * b64.abs()
        off &= ~(torch.isnan(a64) & torch.isnan(b64))
    else:
        off = a64 != b64
    if not off.any():
        return
    first = int(off.nonzero()[0])
    how = "exactly" if atol == 0 and rtol == 0 else f"within atol={atol:g}, rtol={rtol:g}"
    wrong(f"{name}{_index(first, a.shape)} is {a.reshape(-1)[first].item():.6g} but should be "
          f"{b.reshape(-1)[first].item():.6g}; {int(off.sum())} of {off.numel()} elements differ ({how})")


def check(title: str) -> Callable[[Callable[..., None]], Callable[..., Verdict]]:
    """Turn a function that raises through `wrong`/`expect`/`compare` into a check returning a Verdict."""
    def decorate(body: Callable[..., None]) -> Callable[..., Verdict]:
        @functools.wraps(body)
        def checked(*args: Any, **kwargs: Any) -> Verdict:
            try:
                message = body(*args, **kwargs)
            except _NotDone:
                return Verdict(title, NOT_DONE, "fill in the TODO above (replace `raise NotImplementedError`), "
                                                "then run this cell again")
            except _Wrong as err:
                return Verdict(title, WRONG, str(err))
            return Verdict(title, DONE, message or "matches the reference on fresh inputs")
        return checked
    return decorate
