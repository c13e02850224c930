import io
import os

import pytest

from stigmer_sandbox import console
from stigmer_sandbox.errors import ConfigError
from stigmer_sandbox.images import ca


class Tty(io.StringIO):
    def isatty(self):
        return True


def test_colour_only_on_a_terminal_without_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm")
    assert console.colour_enabled(Tty())
    assert not console.colour_enabled(io.StringIO())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not console.colour_enabled(Tty())
    assert console.paint("x", "error", Tty()) == "x"


def test_error_line_is_one_line_with_hint(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    assert console.error_line("boom", "do this") == "error: boom — do this"


def test_bar_and_bytes():
    assert console.bar(0.5, 10) == "█████·····"
    assert console.human_bytes(73_000_000) == "73.0 MB"


def test_ca_detection_order(tmp_path):
    pem = tmp_path / "ca.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\nxx\n-----END CERTIFICATE-----\n")
    found = ca.detect("", {"SSL_CERT_FILE": str(pem), "PIP_CERT": "/missing"})
    assert found is not None and found.source == "SSL_CERT_FILE"
    assert ca.detect("", {}) is None
    assert ca.detect(str(pem), {}).source == "--ca-cert"


def test_explicit_ca_must_exist_and_be_pem(tmp_path):
    with pytest.raises(ConfigError, match="cannot read CA bundle"):
        ca.detect(str(tmp_path / "nope.pem"), {})
    junk = tmp_path / "junk.pem"
    junk.write_text("not a cert")
    with pytest.raises(ConfigError, match="not a PEM"):
        ca.detect(str(junk), {})


LONG_PATH = "/var/lib/stigmer/state/engine/dockerd-started-by-stigmer-sandbox.log " * 3


def test_table_keeps_whole_cells_when_output_is_not_a_terminal(capsys):
    console.table(("step", "result"), [("engine", LONG_PATH.strip())])
    assert LONG_PATH.strip() in capsys.readouterr().out


def test_table_fits_a_terminal_cutting_the_widest_column(monkeypatch):
    screen = Tty()
    monkeypatch.setattr("sys.stdout", screen)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setattr(
        console.shutil, "get_terminal_size", lambda fallback: os.terminal_size((61, 20))
    )
    console.table(("step", "result"), [("engine", LONG_PATH.strip())])
    lines = screen.getvalue().splitlines()
    assert all(len(line) <= 60 for line in lines), lines
    assert lines[1].startswith("engine  /var/lib/stigmer/") and lines[1].endswith("…")


def test_fit_widths_never_cuts_a_column_below_its_minimum():
    assert console.fit_widths([10, 100], 50) == [10, 38]
    assert console.fit_widths([30, 30], 10) == [console.MIN_CELL, console.MIN_CELL]
    assert console.fit_widths([5, 5], 80) == [5, 5]


def test_error_report_is_the_json_form_of_an_error_line():
    assert console.error_report("bad", "fix it", ("a",)) == {
        "error": "bad",
        "hint": "fix it",
        "details": ["a"],
    }
    assert console.error_report("bad") == {"error": "bad"}


@pytest.mark.parametrize(
    ("argv", "wanted"),
    [
        (["doctor", "--json"], True),
        (["run", "--json", "--", "echo", "--json"], True),
        (["run", "--", "echo", "--json"], False),
        (["doctor"], False),
    ],
)
def test_wants_json_reads_options_before_the_double_dash(argv, wanted):
    assert console.wants_json(argv) is wanted


def test_a_task_failure_with_json_is_one_object_on_stdout(capsys):
    import json

    from stigmer_sandbox.tasks import _common

    stop = _common.failure(ConfigError("x.yaml: key 'a' bad", "fix a"), as_json=True)
    out, err = capsys.readouterr()
    assert json.loads(out) == {"error": "x.yaml: key 'a' bad", "hint": "fix a"}
    assert (stop.message, stop.code, err) == (None, 2, "")
    stop = _common.failure(ConfigError("bad"), as_json=False)
    assert stop.message == "error: bad" and stop.code == 2


@pytest.mark.parametrize(
    ("recorded", "shown"),
    [
        ("\x1b[2K\rls", "\\x1b[2K\\rls"),  # erase the line, show another
        ("\x1b]52;c;aGk=\x07", "\\x1b]52;c;aGk=\\x07"),  # write the clipboard
        ("a\nb\tc\x7f\x9b", "a\\nb\\tc\\x7f\\x9b"),  # a new row, DEL, C1 CSI
        ("safe\u202eexe.txt", "safe\\u202eexe.txt"),  # bidi override reorders the line
        ("é 中 ✓ -", "é 中 ✓ -"),  # printable text stays as it is
    ],
)
def test_what_a_terminal_would_act_on_is_shown_escaped(recorded, shown):
    assert console.visible(recorded) == shown


def test_table_cells_and_check_details_are_shown_escaped(capsys):
    console.table(("command",), [("true\x1b[2K\rls",)])
    console.check_line(console.checks.CheckResult("probe", "pass", "read \x1b]0;x\x07"))
    console.detail("log \x1b[31m")
    line = console.error_line("the agent said \x1b[2K\rnothing", "see \x07")
    captured = capsys.readouterr()
    assert "\x1b" not in captured.out + captured.err + line
    assert "true\\x1b[2K\\rls" in captured.out and "read \\x1b]0;x\\x07" in captured.out
