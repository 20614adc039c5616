"""When the next run is due: a fixed interval (--every 15m) or a 5-field cron expression (--cron).

The cron subset is what crontab(5) documents for the five time fields: numbers, `*`, ranges
`a-b`, steps `*/n` and `a-b/n`, lists `a,b`, and month/day names. As in cron, when both
day-of-month and day-of-week are restricted, a day matching either is due.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

_NAMES = {
    3: {n: i for i, n in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1)},
    4: {n: i for i, n in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])},
}
_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
_FIELDS = ["minute", "hour", "day of month", "month", "day of week"]


class CronError(ValueError):
    pass


def _value(text: str, index: int) -> int:
    text = text.lower()
    if text in _NAMES.get(index, {}):
        return _NAMES[index][text]
    try:
        return int(text)
    except ValueError as exc:
        raise CronError(f"Invalid {_FIELDS[index]} {text!r} in the cron expression") from exc


def _field(text: str, index: int) -> set[int]:
    lo, hi = _RANGES[index]
    out: set[int] = set()
    for part in text.split(","):
        base, _, step_text = part.partition("/")
        step = int(step_text) if step_text else 1
        if step < 1:
            raise CronError(f"Invalid step {part!r} in the {_FIELDS[index]} field")
        if base == "*":
            a, b = lo, hi
        elif "-" in base:
            a, b = (_value(x, index) for x in base.split("-", 1))
        else:
            a = b = _value(base, index)
            if step_text:
                b = hi
        if not (lo <= a <= hi and lo <= b <= hi and a <= b):
            raise CronError(f"Invalid {_FIELDS[index]} {part!r}: values go from {lo} to {hi}")
        out.update(range(a, b + 1, step))
    if index == 4 and 7 in out:  # 0 and 7 are both Sunday
        out = (out - {7}) | {0}
    return out


@dataclass
class Cron:
    minutes: set[int]
    hours: set[int]
    days: set[int]
    months: set[int]
    weekdays: set[int]
    day_any: bool
    weekday_any: bool

    @classmethod
    def parse(cls, expr: str) -> "Cron":
        parts = expr.split()
        if len(parts) != 5:
            raise CronError(f"Invalid cron expression {expr!r}: it needs 5 fields (minute hour day-of-month month day-of-week), e.g. '*/15 * * * *'")
        sets = [_field(p, i) for i, p in enumerate(parts)]
        return cls(*sets, day_any=parts[2] == "*", weekday_any=parts[4] == "*")

    def _day_ok(self, t: datetime) -> bool:
        dom = t.day in self.days
        dow = (t.isoweekday() % 7) in self.weekdays
        if self.day_any or self.weekday_any:
            return dom and dow
        return dom or dow

    def next_after(self, t: datetime) -> datetime:
        t = t.replace(second=0, microsecond=0) + timedelta(minutes=1)
        limit = t + timedelta(days=366 * 5)
        while t < limit:
            if t.month not in self.months or not self._day_ok(t):
                t = (t + timedelta(days=1)).replace(hour=0, minute=0)
                continue
            if t.hour not in self.hours:
                t = (t + timedelta(hours=1)).replace(minute=0)
                continue
            if t.minute not in self.minutes:
                t += timedelta(minutes=1)
                continue
            return t
        raise CronError("the cron expression never matches")


def next_due(last_start: datetime, now: datetime, *, every_s: float | None, cron: Cron | None) -> datetime:
    if cron is not None:
        return cron.next_after(now)
    due = last_start + timedelta(seconds=every_s)
    return due if due > now else now  # a run longer than the interval: start the next one at once
