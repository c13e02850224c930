"""The sandbox bootstrap (MCP server packages at start): parsing, validation, argv, flow."""

from __future__ import annotations

from pathlib import Path

import pytest

from stigmer_sandbox import config
from stigmer_sandbox.errors import ConfigError, UsageError
from stigmer_sandbox.runtime import bootstrap
from stigmer_sandbox.runtime.client.commands import ExecResult

NPM_OK = [
    "@modelcontextprotocol/server-filesystem@2026.8.31",
    "@modelcontextprotocol/server-everything",
    "left-pad",
    "x@^1.2.0",
    "x@~1.2",
    "x@>=1.0",
    "x@latest",
    "x@1.0.0-rc.1",
    "JSONStream",
]
NPM_BAD = [
    "../evil",
    "./local-dir",
    "/abs/path",
    "-g",
    "--prefix=/tmp",
    "foo bar",
    "https://example.invalid/x.tgz",
    "git+ssh://git@example.invalid/x.git",
    "github:user/repo",
    "file:../x",
    "foo;id",
    "$(id)",
    "`id`",
    "foo|id",
    "@scope",
    "@scope/",
    "x@",
    "x@1 || 2",
    "alias@npm:x@1",
    "café",
    "x" * 300,
]
PIP_OK = [
    "mcp-server-time==2026.10.19",
    "mcp-server-time",
    "ruff@latest",
    "ruff@0.6.0",
    "pkg[cli]>=1.0",
    "a.b_c-d~=1.2",
    "pkg==1.*",
    "pkg!=2",
]
PIP_BAD = [
    "-e .",
    "-e",
    "--index-url=http://x",
    "./local",
    "../x.whl",
    "/abs/x.whl",
    "pkg @ https://example.invalid/x.whl",
    "pkg@https://example.invalid/x.whl",
    "pkg;python_version<'3.8'",
    "pkg --index-url http://x",
    "pkg==1;id",
    "pkg=1",
    "pkg[a]b",
    "$(id)",
    "-pkg",
    "pkg-",
]


def settings(**changes) -> config.Settings:
    return config.load_settings("/nonexistent-project", environ={}, **changes)


def result(code: int | None = 0, out: str = "", timed_out: bool = False) -> ExecResult:
    return ExecResult(exit_code=code, stdout=out, stderr="", duration_s=0.1, timed_out=timed_out)


class FakeSandbox:
    """Records every exec; answers the marker read and each install from a script."""

    name = "fake-sandbox"

    def __init__(self, current: config.Settings, marker: str = "", fail: dict | None = None):
        self.settings = current
        self.marker = marker
        self.fail = fail or {}
        self.calls: list[tuple[list[str], dict]] = []

    def exec(self, command, **options) -> ExecResult:
        assert isinstance(command, list), "bootstrap must never pass a shell string"
        self.calls.append((command, options))
        if command[0] == "cat":
            return result(0, self.marker + "\n") if self.marker else result(1)
        if command[0] == "/bin/sh":
            self.marker = command[-1]
            return result(0)
        spec = command[-1]
        if spec in self.fail:
            return result(1, self.fail[spec])
        return result(0, "added 1 package in 1s\n")

    def installs(self) -> list[str]:
        return [argv[-1] for argv, _ in self.calls if argv[0] in ("npm", "uv")]


# -- parsing and validation ----------------------------------------------------------------


def test_split_packages_drops_blanks_padding_and_repeats():
    assert config.split_packages(" a, b@1,,c ,a, ") == ["a", "b@1", "c"]
    assert config.split_packages("") == []
    assert config.split_packages(" , ") == []


@pytest.mark.parametrize("spec", NPM_OK)
def test_npm_specs_accepted(spec):
    assert config.bad_package("npm-packages", spec) is None
    assert settings(bootstrap_npm_packages=spec).bootstrap_npm_packages == spec


@pytest.mark.parametrize("spec", NPM_BAD)
def test_npm_non_specs_refused(spec):
    assert config.bad_package("npm-packages", f"left-pad, {spec}") == spec.strip()


@pytest.mark.parametrize("spec", PIP_OK)
def test_pip_specs_accepted(spec):
    assert config.bad_package("pip-packages", spec) is None


@pytest.mark.parametrize("spec", PIP_BAD)
def test_pip_non_specs_refused(spec):
    assert config.bad_package("pip-packages", f"ruff, {spec}") == spec.strip()


def test_stigmer_variables_set_the_keys():
    env = {
        "STIGMER_BOOTSTRAP_NPM_PACKAGES": "@modelcontextprotocol/server-filesystem@2026.8.31",
        "STIGMER_BOOTSTRAP_PIP_PACKAGES": "mcp-server-time==2026.10.19, ruff",
    }
    current = config.load_settings("/nonexistent-project", environ=env)
    wanted = bootstrap.requested(current)
    assert wanted[bootstrap.NPM] == ["@modelcontextprotocol/server-filesystem@2026.8.31"]
    assert wanted[bootstrap.PIP] == ["mcp-server-time==2026.10.19", "ruff"]


def test_project_file_and_invoke_variables_set_the_keys(tmp_path: Path):
    (tmp_path / "invoke.yaml").write_text("stigmer:\n  bootstrap_pip_packages: ruff\n")
    assert config.load_settings(tmp_path, environ={}).bootstrap_pip_packages == "ruff"
    env = {"INVOKE_STIGMER_BOOTSTRAP_NPM_PACKAGES": "left-pad"}
    assert config.load_settings(tmp_path, environ=env).bootstrap_npm_packages == "left-pad"


def test_a_bad_spec_is_one_line_naming_variable_key_and_spec():
    env = {"STIGMER_BOOTSTRAP_NPM_PACKAGES": "left-pad, --prefix=/etc"}
    with pytest.raises(ConfigError) as caught:
        config.load_settings("/nonexistent-project", environ=env)
    message = caught.value.message
    assert "\n" not in message
    assert message.startswith("STIGMER_BOOTSTRAP_NPM_PACKAGES: key 'bootstrap_npm_packages'")
    assert "'--prefix=/etc', which is not an npm package spec" in message


def test_a_bad_spec_in_the_project_file_names_the_file(tmp_path: Path):
    (tmp_path / "invoke.yaml").write_text("stigmer:\n  bootstrap_pip_packages: '-e .'\n")
    with pytest.raises(ConfigError, match=r"invoke.yaml: key 'bootstrap_pip_packages' has '-e \.'"):
        config.load_settings(tmp_path, environ={})


# -- argv ----------------------------------------------------------------------------------


def test_npm_argv_installs_globally_with_the_spec_after_double_dash():
    argv = bootstrap.install_argv(bootstrap.NPM, "@modelcontextprotocol/server-filesystem@1.0.0")
    assert argv[:3] == ["npm", "install", "--global"]
    assert argv[-2:] == ["--", "@modelcontextprotocol/server-filesystem@1.0.0"]


def test_pip_argv_is_uv_tool_install_with_the_spec_after_double_dash():
    argv = bootstrap.install_argv(bootstrap.PIP, "mcp-server-time==2026.10.19")
    assert argv[:3] == ["uv", "tool", "install"]
    assert argv[-2:] == ["--", "mcp-server-time==2026.10.19"]


@pytest.mark.parametrize("spec", ["a,b", " a", "", "--force", "a; id", "x y"])
def test_argv_refuses_what_is_not_one_spec(spec):
    with pytest.raises(UsageError, match="bootstrap_pip_packages"):
        bootstrap.install_argv(bootstrap.PIP, spec)


# -- failure reasons -----------------------------------------------------------------------

NPM_ETARGET = """\
npm error code ETARGET
npm error notarget No matching version found for @modelcontextprotocol/sdk@0.0.0-missing.
npm error notarget In most cases you or one of your dependencies are requesting
npm error notarget a package version that doesn't exist.
npm error A complete log of this run can be found in: /home/sandbox/.npm/_logs/x.log
"""
NPM_EACCES = """\
npm error code EACCES
npm error syscall mkdir
npm error path /opt/node/lib/node_modules/x
npm error errno -13
npm error Error: EACCES: permission denied, mkdir '/opt/node/lib/node_modules/x'
"""
UV_NO_SOLUTION = """\
warning: something unrelated
error: No solution found when resolving dependencies
  cause: Because there is no version of mcp-server-time==1999.1.1 and you require it, \
we can conclude that your requirements are unsatisfiable.
"""


def test_failure_reason_picks_the_line_that_says_why():
    assert bootstrap.failure_reason(NPM_ETARGET) == (
        "notarget No matching version found for @modelcontextprotocol/sdk@0.0.0-missing."
    )
    assert bootstrap.failure_reason(NPM_EACCES).startswith("Error: EACCES: permission denied")
    assert bootstrap.failure_reason(UV_NO_SOLUTION).startswith(
        "cause: Because there is no version of mcp-server-time==1999.1.1"
    )
    assert bootstrap.failure_reason("") == ""
    assert len(bootstrap.failure_reason("error: " + "x" * 1000)) == bootstrap.REASON_CHARS


def test_outcome_lines_say_what_installed_how_long_and_why_not():
    outcome = bootstrap.Outcome("npm", ("a@1",), (("b@9", "no such version"),), 12.34)
    assert outcome.lines() == [
        "bootstrap npm: 1 of 2 packages installed in 12.3 s (a@1)",
        "bootstrap npm: b@9 failed, skipped: no such version",
    ]
    single = bootstrap.Outcome("pip", ("ruff",), (), 1.0)
    assert single.lines() == ["bootstrap pip: 1 of 1 package installed in 1.0 s (ruff)"]


# -- on_start ------------------------------------------------------------------------------


def test_nothing_configured_runs_nothing():
    box = FakeSandbox(settings())
    assert bootstrap.on_start(box, started=True) == []
    assert box.calls == []


def test_a_started_sandbox_installs_each_package_and_carries_on_after_a_failure():
    current = settings(
        bootstrap_npm_packages="bad-pkg@9.9.9, good-pkg@1.0.0",
        bootstrap_pip_packages="mcp-server-time==2026.10.19",
    )
    box = FakeSandbox(current, fail={"bad-pkg@9.9.9": NPM_ETARGET})
    lines = bootstrap.on_start(box, started=True)
    assert box.installs() == ["bad-pkg@9.9.9", "good-pkg@1.0.0", "mcp-server-time==2026.10.19"]
    assert lines[0].startswith("bootstrap npm: 1 of 2 packages installed in ")
    assert lines[1].startswith("bootstrap npm: bad-pkg@9.9.9 failed, skipped: notarget No")
    assert lines[2].startswith("bootstrap pip: 1 of 1 package installed in ")
    assert not any(argv[0] == "cat" for argv, _ in box.calls), "a fresh start needs no marker"
    for argv, options in box.calls:
        if argv[0] in ("npm", "uv"):
            assert options["cwd"] == "/home/sandbox"
            assert options["merge_output"] is True
            assert options["timeout"] == current.timeout
    assert box.marker == bootstrap.digest(bootstrap.requested(current))


def test_a_running_sandbox_that_had_this_list_installs_nothing():
    current = settings(bootstrap_npm_packages="left-pad")
    done = bootstrap.digest(bootstrap.requested(current))
    box = FakeSandbox(current, marker=done)
    assert bootstrap.on_start(box, started=False) == []
    assert box.installs() == []


def test_a_running_sandbox_without_this_list_installs_it():
    current = settings(bootstrap_npm_packages="left-pad")
    box = FakeSandbox(current, marker="an-older-list")
    assert bootstrap.on_start(box, started=False)[0].startswith("bootstrap npm: 1 of 1")
    assert box.installs() == ["left-pad"]


def test_a_timed_out_install_is_a_failure_not_an_error():
    current = settings(bootstrap_pip_packages="slow-pkg")
    box = FakeSandbox(current)
    box.exec = lambda command, **options: result(124, "", timed_out=True)  # type: ignore[method-assign]
    outcome = bootstrap.install(box, bootstrap.requested(current))[0]  # type: ignore[arg-type]
    assert outcome.installed == ()
    assert outcome.failed == (("slow-pkg", "ended by timeout after 0 s"),)


def test_no_network_skips_with_a_note():
    box = FakeSandbox(settings(bootstrap_npm_packages="left-pad", network="none"))
    assert bootstrap.on_start(box, started=True) == [
        "bootstrap skipped: fake-sandbox has no network (network: none)"
    ]
    assert box.installs() == []
