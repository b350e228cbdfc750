"""Small checks shared by every validation rule: each appends "key: what is wrong (got X); the fix"
to the list of problems, so all of them are reported at once."""

from __future__ import annotations

from ftune.registry import did_you_mean


def choice(problems: list[str], key: str, value: object, valid: tuple | list) -> None:
    if value not in valid:
        hint = did_you_mean(str(value), [str(v) for v in valid])
        problems.append(f"{key} must be one of {', '.join(map(str, valid))} (got {value!r}).{hint}")


def positive(problems: list[str], key: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        problems.append(f"{key} must be {'>= 0' if allow_zero else '> 0'} (got {value})")


def within(problems: list[str], key: str, value: float, low: float, high: float, closed: str = "[)") -> None:
    """value in the interval low..high; closed says which ends belong to it: "[)", "(]", "[]" or "()"."""
    ok_low = value >= low if closed[0] == "[" else value > low
    ok_high = value <= high if closed[1] == "]" else value < high
    if not (ok_low and ok_high):
        problems.append(f"{key} must be in {closed[0]}{low}, {high}{closed[1]} (got {value})")
