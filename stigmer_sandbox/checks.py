"""One result type for every check this tool runs, and one JSON shape for a report.

`inv doctor`, `inv sandbox.test` and `inv sandbox.audit` all produce `CheckResult`s
and print them with `console.check_line`; with `--json` each prints `report(...)`:
`{"ok": bool, "checks": [CheckResult.to_dict(), ...], <context>}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

Status = Literal["pass", "warn", "fail"]


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one check: what was checked, the verdict and what was seen.

    `item` is the SECURITY.md property number (audit only), `seconds` how long the
    check took (smoke tests only). A check that is not `required` is shown when it
    fails but does not fail the report (some of `doctor`'s, e.g. low disk space).
    """

    name: str
    status: Status
    detail: str
    hint: str | None = None
    seconds: float | None = None
    item: int | None = None
    required: bool = True

    @property
    def passed(self) -> bool:
        """The check found what it wanted."""
        return self.status == "pass"

    @property
    def failed(self) -> bool:
        """The check makes its report fail."""
        return self.required and self.status == "fail"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form: every field, always present."""
        return asdict(self)


def verdict(ok: bool) -> Status:
    """`pass` or `fail`, for checks that know no middle ground."""
    return "pass" if ok else "fail"


def report(results: Sequence[CheckResult], **context: Any) -> dict[str, Any]:
    """The one JSON shape of a list of results, with what they were run against."""
    return {
        **context,
        "ok": not any(r.failed for r in results),
        "checks": [r.to_dict() for r in results],
    }


def summary(results: Sequence[CheckResult]) -> str:
    """`12 passed, 1 warning, 0 failed`: the line under a printed report."""
    passed, warned, failed = (sum(r.status == s for r in results) for s in ("pass", "warn", "fail"))
    warnings = f", {warned} warning{'' if warned == 1 else 's'}" if warned else ""
    return f"{passed} passed{warnings}, {failed} failed"
