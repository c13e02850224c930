"""Issue 20: Linux names are bytes. The pure encoding logic (text with lone surrogates
to bytes and back, deepagents' helper commands, request checks, upload entries) and the
batch script's resolution on this host through `LocalSandbox`: undecodable names, and
links its user made, which it never follows."""

from __future__ import annotations

import base64
import json
import os
import re
from pathlib import Path

import pytest
from deepagents.backends import sandbox as deepagents_sandbox
from deepagents.backends.protocol import ExecuteResponse
from hypothesis import given
from hypothesis import strategies as st

from stigmer_sandbox import config
from stigmer_sandbox.errors import UsageError
from stigmer_sandbox.integrations.deepagents import LinuxText, StigmerSandbox, escaping_arguments
from stigmer_sandbox.runtime import LocalSandbox
from stigmer_sandbox.runtime.client import files
from stigmer_sandbox.runtime.client.commands import Request, from_bytes, to_bytes

from ..conftest import ROOT

NAMES = st.binary(min_size=1, max_size=64).filter(
    lambda name: b"\0" not in name and b"/" not in name and name not in (b".", b"..")
)
STRICT_ARGUMENT = re.compile(r"b64decode\('[^']*'\)\.decode\('utf-8'\)")


@given(st.binary(max_size=256))
def test_any_bytes_round_trip_through_text(data):
    assert to_bytes(from_bytes(data)) == data
    assert LinuxText(from_bytes(data)).encode() == data


@given(st.lists(NAMES, min_size=1, max_size=5))
def test_any_absolute_bytes_path_travels_to_the_batch_script_intact(names):
    path = b"/workspace/" + b"/".join(names)
    text = files.as_path(path)
    assert text is not None and files.path_problem(text) is None
    travelled = json.loads(json.dumps([{"path": text}]))[0]["path"]  # the upload header
    assert travelled.encode("utf-8", "surrogateescape") == path
    assert os.fsencode(travelled) == path  # what the batch script's os.open is given


def test_a_surrogate_that_stands_for_no_byte_is_refused():
    with pytest.raises(UsageError, match="stands for no byte"):
        to_bytes("\ud800")
    assert files.path_problem("/w/\ud800") == "invalid_path"
    assert files.path_problem("/w/x\udcff") is None


def settings() -> config.Settings:
    return config.load_settings(ROOT, environ={})


@pytest.mark.parametrize(
    "options",
    [
        {"stdin": "\udcff"},
        {"env": {"V": "\udcff"}},
        {"cwd": "/workspace/\udcff"},
    ],
)
def test_requests_carry_undecodable_bytes(options):
    cwd = options.pop("cwd", "/workspace")
    request = Request.build(settings(), "echo \udcff", {**options, "cwd": cwd})
    assert request.argv[-1] == "echo \udcff" and to_bytes(request.argv[-1]) == b"echo \xff"
    if "stdin" in options:
        assert request.stdin == b"\xff"


@pytest.mark.parametrize(
    ("command", "cwd", "options"),
    [
        ("echo \ud800", "/workspace", {}),
        (["echo", "\ud800"], "/workspace", {}),
        ("true", "/workspace", {"env": {"V": "\ud800"}}),
        ("true", "/workspace", {"env": {"\ud800": "v"}}),
        ("true", "/workspace", {"stdin": "\ud800"}),
        ("true", "/w/\ud800", {}),
    ],
)
def test_text_no_bytes_stand_for_is_one_clear_usage_error(command, cwd, options):
    with pytest.raises(UsageError, match="stands for no byte"):
        Request.build(settings(), command, {**options, "cwd": cwd})


def test_every_deepagents_helper_reads_its_arguments_with_surrogateescape():
    path = LinuxText("/workspace/d\udcff/x\udcff")
    commands = [
        deepagents_sandbox._build_ls_cmd(path),
        deepagents_sandbox._build_read_cmd(path, 0, 10),
        deepagents_sandbox._build_write_preflight_cmd(path),
        deepagents_sandbox._build_glob_cmd(LinuxText("*\udcff"), path),
        deepagents_sandbox._build_grep_cmd(LinuxText("p\udcff"), path, LinuxText("a/*\udcff")),
        deepagents_sandbox._build_edit_tmpfile_cmd(path, "/tmp/o", "/tmp/n", replace_all=False),
    ]
    wanted = base64.b64encode(b"/workspace/d\xff/x\xff").decode()
    for command in commands:
        escaped = escaping_arguments(command)
        assert STRICT_ARGUMENT.search(command), "deepagents changed how it passes arguments"
        assert not STRICT_ARGUMENT.search(escaped)
        assert f"b64decode('{wanted}').decode('utf-8', 'surrogateescape')" in escaped


@pytest.mark.parametrize(
    ("entry", "error"),
    [
        (("/w/x",), files.NOT_A_PAIR),
        ("/w/x", files.NOT_A_PAIR),
        (None, files.NOT_A_PAIR),
        (("/w/x", b"a", b"b"), files.NOT_A_PAIR),
        (("/w/x", "text"), "error: content must be bytes"),
        (("/w/x", None), "error: content must be bytes"),
        ((7, b"a"), "invalid_path"),
        (("/w/\ud800", b"a"), "invalid_path"),
        ((b"/w/x\xff", b"a"), None),
        ((Path("/w/x\udcff"), b"a"), None),
    ],
)
def test_each_upload_entry_is_checked_on_its_own(entry, error):
    assert files.checked_upload(entry).problem == error


def test_bytes_and_path_objects_are_answered_as_round_tripping_text():
    assert files.shown_path(b"/w/x\xff") == "/w/x\udcff"
    assert files.shown_path(Path("/w/y")) == "/w/y"
    assert files.shown_path(7) == "7"


@pytest.fixture
def local(tmp_path):
    current = settings().replace(
        execution_mode="local", workspace=str(tmp_path / "ws"), state_dir=str(tmp_path / "st")
    )
    return LocalSandbox(current).up()


def test_local_mode_lists_reads_and_writes_undecodable_names(local, tmp_path):
    workspace = os.fsencode(local.workspace)
    os.mkdir(workspace + b"/d\xff")
    with open(workspace + b"/d\xff/made-by-bytes\xfe", "wb") as handle:
        handle.write(b"on disk\n")
    text = os.fsdecode(workspace)
    backend = StigmerSandbox(local)
    listed = backend.ls(f"{text}/d\udcff").entries or []
    assert [e["path"] for e in listed] == [f"{text}/d\udcff/made-by-bytes\udcfe"]
    assert backend.read(f"{text}/d\udcff/made-by-bytes\udcfe").file_data == {
        "content": "on disk",
        "encoding": "utf-8",
    }
    assert backend.write(f"{text}/d\udcff/new\udcff", "written\n").error is None
    assert Path(os.fsdecode(workspace + b"/d\xff/new\xff")).read_bytes() == b"written\n"
    done = backend.execute("printf %s \udcff > ws-\udcff && od -An -tx1 ws-\udcff")
    assert (done.exit_code, done.output.split()) == (0, ["ff"])
    assert local.download_files([workspace + b"/ws-\xff"])[0].content == b"\xff"


def test_local_mode_never_follows_a_link_its_user_made(local, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"outside")
    link = local.workspace / "link"
    link.symlink_to(outside)
    os.lchown(link, 1000, 1000)  # as if the sandbox user made it (tests run as root here)
    up = local.upload_files([(f"{link}/new", b"x"), (f"{link}/secret", b"x")])
    assert [u.error for u in up] == ["invalid_path", "invalid_path"]
    assert local.download_files([f"{link}/secret"])[0].error == "invalid_path"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_bytes() == b"outside"


def test_local_mode_follows_root_links_but_never_into_the_kernel(local, tmp_path):
    real = local.workspace / "real"
    real.mkdir()
    (local.workspace / "root-link").symlink_to(real)
    assert local.upload_files([(f"{local.workspace}/root-link/f", b"via root")])[0].error is None
    assert (real / "f").read_bytes() == b"via root"
    (local.workspace / "to-proc").symlink_to("/proc/self")
    assert local.download_files([f"{local.workspace}/to-proc/environ"])[0].error == ("invalid_path")


def test_a_trailing_slash_names_a_folder(local):
    folder = f"{local.workspace}/folder"
    os.mkdir(folder)
    assert local.upload_files([(f"{folder}/", b"x"), (f"{folder}/.", b"x")])[0].error == (
        "is_directory"
    )
    assert local.download_files([f"{folder}/"])[0].error == "is_directory"


class CannedGrep(StigmerSandbox):
    """A backend whose commands all print one grep record (as rg --encoding none would
    for a line with an undecodable byte), read the way `execute` reads helpers."""

    def __init__(self) -> None:  # no sandbox: nothing runs
        pass

    def execute(self, command: str, *, timeout: int | None = None) -> ExecuteResponse:
        return ExecuteResponse(output="/w/x\udcff\x001:needle \udcff\n", exit_code=0)


def test_grep_paths_round_trip_but_its_lines_are_text_a_model_can_read():
    found = CannedGrep().grep("needle", "/w")
    assert found.matches == [{"path": "/w/x\udcff", "line": 1, "text": "needle \ufffd"}]
    texts = [match["text"] for match in found.matches or []]
    json.dumps(texts, ensure_ascii=False).encode()  # what a model's HTTP client sends
