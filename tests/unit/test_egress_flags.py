"""The egress policy as a user gives it: `--egress`, `--allow`, `--deny`, `--allow-preset` on
every task that makes a sandbox, the same keywords on `Sandbox`, and settings that add to
the configured entries. A bad entry is one line naming it, a non-zero exit, never a
traceback, and nothing is started (no engine is needed: every case fails before)."""

from __future__ import annotations

import pytest

from stigmer_sandbox import config
from stigmer_sandbox.errors import ConfigError
from stigmer_sandbox.runtime import Sandbox

from ..conftest import run_inv

BAD_ENTRIES = ["http://x", "999.1.1.1/40", "*", "", "example.org:70000", "a..b"]
# compose.up takes none yet: compose sandboxes do not enforce a policy (it warns).
TASKS = [["run"], ["sandbox.up"]]


def test_entries_and_presets_are_added_to_the_configured_ones_and_the_mode_replaced():
    base = config.Settings(allow="pypi.org", deny="10.9.9.9")
    chosen = base.with_egress("allowlist", ["*.npmjs.org"], ["example.com:443"], ["python"])
    assert chosen.egress == "allowlist"
    assert chosen.allow == "pypi.org,*.npmjs.org"
    assert chosen.deny == "10.9.9.9,example.com:443"  # a configured deny is never dropped
    assert chosen.allow_presets == "python"
    assert base.with_egress() == base


def test_a_single_entry_given_bare_is_one_entry():
    assert config.Settings().with_egress(allow="pypi.org").allow == "pypi.org"  # type: ignore[arg-type]


@pytest.mark.parametrize("entry", BAD_ENTRIES)
def test_a_bad_entry_is_refused_naming_it(entry):
    with pytest.raises(ConfigError) as raised:
        config.Settings().with_egress(allow=[entry])
    assert "allow" in raised.value.message and (repr(entry) in raised.value.message or not entry)


def test_a_bad_mode_or_preset_is_refused():
    with pytest.raises(ConfigError, match="egress"):
        config.Settings().with_egress("closed")
    with pytest.raises(ConfigError, match="allow_presets"):
        config.Settings().with_egress(allow_presets=["ruby"])


def test_the_sandbox_takes_the_same_keywords(tmp_path):
    box = Sandbox(
        config.Settings(project_dir=str(tmp_path)),
        egress="allowlist",
        allow=["pypi.org"],
        deny=["10.0.0.0/8"],
        allow_presets=["node"],
    )
    assert (box.settings.egress, box.settings.allow) == ("allowlist", "pypi.org")
    assert (box.settings.deny, box.settings.allow_presets) == ("10.0.0.0/8", "node")
    with pytest.raises(ConfigError, match=r"999\.1\.1\.1/40"):
        Sandbox(config.Settings(project_dir=str(tmp_path)), deny=["999.1.1.1/40"])


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t[0])
@pytest.mark.parametrize("flag", ["--allow", "--deny"])
def test_every_task_that_makes_a_sandbox_refuses_a_bad_entry_in_one_line(task, flag):
    done = run_inv(*task, flag, "http://x", *(["true"] if task == ["run"] else []))
    assert done.returncode != 0
    assert "Traceback" not in done.stderr + done.stdout
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "'http://x'" in lines[0], done.stderr


@pytest.mark.parametrize("task", TASKS, ids=lambda t: t[0])
def test_every_task_that_makes_a_sandbox_has_the_egress_flags_in_its_help(task):
    done = run_inv("--help", task[0])
    for flag in ("--egress", "--allow", "--deny", "--allow-preset"):
        assert flag in done.stdout, flag
    assert "python" in done.stdout and "node" in done.stdout


def test_the_sandbox_takes_secrets_by_name(tmp_path):
    defined = {"API_TOKEN": {"from_env": "MY_TOKEN", "hosts": ["api.example.com"]}}
    base = config.Settings(project_dir=str(tmp_path), secrets=defined)
    assert Sandbox(base, secrets=["API_TOKEN"]).settings.use_secrets == "API_TOKEN"
    twice = base.with_egress(secrets=["API_TOKEN"]).with_egress(secrets=["API_TOKEN"])
    assert twice.use_secrets == "API_TOKEN"
    with pytest.raises(ConfigError, match=r"unknown secret 'NOPE' \(defined: API_TOKEN\)"):
        Sandbox(base, secrets=["NOPE"])
    with pytest.raises(ConfigError, match="use_secrets"):
        Sandbox(base, egress="open", secrets=["API_TOKEN"])  # no gateway to carry it
