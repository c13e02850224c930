"""Issue 20: Linux names and arguments are bytes, on a real sandbox, through every API.

A name with undecodable bytes (b"x\\xff") is the text "x\\udcff" (what `os.fsdecode`
gives) everywhere, both ways: `Sandbox.exec` with argv, env, cwd and stdin, put_file /
get_file, upload_files / download_files, and every protocol method of the deepagents
backend. What cannot work (a surrogate that stands for no byte) is an error result,
never an exception. Files are made by bytes inside the sandbox and read back by text,
and the reverse, checking the bytes on disk with `od`.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from pathlib import Path

import pytest

from stigmer_sandbox.errors import UsageError
from stigmer_sandbox.integrations.deepagents import StigmerSandbox
from stigmer_sandbox.runtime import Sandbox

from ..conftest import ROOT
from .conftest import TEST_LABELS
from .test_graphton import graphton_python  # noqa: F401  (the Graphton venv, a fixture
from .test_runtime import make_sandbox

MEMORY = "256m"
# Graphton's backend, in Graphton's venv, on this module's sandbox (found by name with the
# same settings, so it is reused, never recreated); what it saw is printed as JSON.
GRAPHTON_DRIVER = """
import json, sys
from pathlib import Path
from stigmer_sandbox import config
from stigmer_sandbox.runtime import Sandbox
from stigmer_sandbox.integrations.graphton import StigmerGraphtonBackend

args = json.loads(sys.argv[1])
tmp = Path(args["tmp"])
settings = config.load_settings(Path(args["project"]), environ={}).replace(
    workspace=str(tmp / "workspace"), logs=str(tmp / "logs"), state_dir=str(tmp / "state"),
    memory=args["memory"],
)
box = Sandbox(settings, name=args["name"], extra_labels=args["labels"])
backend = StigmerGraphtonBackend(box)
seen = {"listed": backend.list_files("u"), "read": backend.read("u/l\\udcff")}
backend.write("u/w\\udcff", "written")
seen["is_dir"] = [backend.is_directory("u/d\\udcff"), backend.is_directory("u/w\\udcff")]
seen["deleted"] = backend.delete("u/l\\udcff")
seen["after"] = sorted(backend.list_files("u"))
try:
    backend.write("u/bad", "\\ud800")
except Exception as exc:
    seen["no_byte"] = type(exc).__name__ + ": " + str(exc)
backend.close()
print(json.dumps(seen))
"""

# The exact bytes of a name, one hex pair per byte (od), e.g. "78ff" for b"x\xff".
HEX = "od -An -tx1 | tr -d ' \\n'"


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("undecodable")


@pytest.fixture(scope="module")
def sandbox(folders, docker_engine):
    with make_sandbox(folders, memory=MEMORY) as box:
        yield box


@pytest.fixture(scope="module")
def backend(sandbox):
    return StigmerSandbox(sandbox)


@pytest.fixture(autouse=True)
def fresh_folder(sandbox):
    """Each test starts with an empty /workspace/u (made and listed by argv: no str
    command, so these run whatever the agent does with surrogates in one)."""
    sandbox.exec(["/bin/sh", "-c", "rm -rf /workspace/u && mkdir /workspace/u"])


def name_bytes(sandbox: Sandbox, folder: str = "/workspace/u") -> list[str]:
    """The names in `folder`, each as the hex of its bytes."""
    listing = sandbox.exec(
        [
            "/bin/sh",
            "-c",
            f'for n in "$1"/*; do printf %s "${{n##*/}}" | {HEX}; echo; done',
            "sh",
            folder,
        ]
    )
    return sorted(listing.stdout.split())


def make_by_bytes(sandbox: Sandbox, name: str, content: str = "by bytes") -> None:
    """A file whose name is built from printf escapes inside the sandbox (`\\377` = 0xff)."""
    script = f'printf %s "{content}" > "/workspace/u/$(printf "{name}")"'
    assert sandbox.exec(["/bin/sh", "-c", script]).exit_code == 0


def test_argv_env_cwd_and_stdin_carry_the_bytes(sandbox):
    assert sandbox.exec(["/bin/sh", "-c", f'printf %s "$1" | {HEX}', "sh", "\udcff"]).stdout == (
        "ff"
    )
    assert sandbox.exec(
        ["/bin/sh", "-c", f'printf %s "$V" | {HEX}'], env={"V": "a\udcfe"}
    ).stdout == ("61fe")
    assert sandbox.exec(["/bin/sh", "-c", HEX], stdin="\udcff\udc80").stdout == "ff80"
    sandbox.exec(["mkdir", "/workspace/u/d\udcff"])
    assert sandbox.exec(["/bin/sh", "-c", f"pwd | {HEX}"], cwd="u/d\udcff").stdout == (
        "2f776f726b73706163652f752f64ff0a"
    )


def test_a_string_command_carries_the_bytes(sandbox, backend):
    assert sandbox.exec(f"printf %s \udcff | {HEX}").stdout == "ff"
    response = backend.execute(f"touch /workspace/u/t\udcff && printf %s \udcfe | {HEX}")
    assert (response.exit_code, response.output) == (0, "fe")
    assert name_bytes(sandbox) == ["74ff"]


def test_a_surrogate_that_stands_for_no_byte_is_one_clear_error(sandbox, backend):
    for bad in (["echo", "\ud800"], "echo \ud800"):
        with pytest.raises(UsageError, match="stands for no byte"):
            sandbox.exec(bad)
    response = backend.execute("echo \ud800")
    assert response.exit_code == 1 and "stands for no byte" in response.output


def test_put_and_get_file_by_undecodable_names(sandbox):
    sandbox.put_file("u/p\udcff", b"put")
    assert name_bytes(sandbox) == ["70ff"]
    make_by_bytes(sandbox, "g\\376")
    assert sandbox.get_file("u/g\udcfe") == b"by bytes"


def test_put_file_writes_text_data_with_its_bytes(sandbox):
    sandbox.put_file("u/text", "a\udcff")
    assert sandbox.get_file("u/text") == b"a\xff"


def test_upload_and_download_by_undecodable_names_both_ways(sandbox):
    done = sandbox.upload_files(
        [("/workspace/u/d\udcff/up\udcff", b"up"), (b"/workspace/u/b\xfe", b"b")]
    )
    assert [d.error for d in done] == [None, None]
    assert [d.path for d in done] == ["/workspace/u/d\udcff/up\udcff", "/workspace/u/b\udcfe"]
    assert name_bytes(sandbox) == ["62fe", "64ff"]
    assert name_bytes(sandbox, "/workspace/u/d\udcff") == ["7570ff"]
    make_by_bytes(sandbox, "m\\377")
    got = sandbox.download_files(["/workspace/u/m\udcff", b"/workspace/u/m\xff"])
    assert [(g.path, g.content) for g in got] == [("/workspace/u/m\udcff", b"by bytes")] * 2


def test_malformed_upload_entries_are_answered_one_by_one(backend):
    files = [
        ("/workspace/u/ok", b"ok"),
        ("/workspace/u/only-a-path",),
        "/workspace/u/a-string",
        ("/workspace/u/text", "not bytes"),
        (7, b"x"),
        ("/workspace/u/\ud800", b"x"),
        ("/workspace/u/fine\udcff", b"fine"),
    ]
    errors = [r.error for r in backend.upload_files(files)]  # type: ignore[arg-type]
    assert errors[0] is None and errors[-1] is None
    assert errors[1] == errors[2] == "error: each file must be a (path, bytes) pair"
    assert errors[3] == "error: content must be bytes"
    assert errors[4] == errors[5] == "invalid_path"
    downloads = backend.download_files([7, None, "/workspace/u/\ud800", "/workspace/u/ok"])  # type: ignore[list-item]
    assert [d.error for d in downloads] == ["invalid_path"] * 3 + [None]
    assert backend.upload_files(None) == [] and backend.download_files(None) == []  # type: ignore[arg-type]


def test_deepagents_file_tools_list_read_write_and_edit_undecodable_names(sandbox, backend):
    make_by_bytes(sandbox, "made\\377", "one\ntwo\n")
    assert backend.ls("/workspace/u").entries == [
        {"path": "/workspace/u/made\udcff", "is_dir": False}
    ]
    assert backend.read("/workspace/u/made\udcff").file_data == {
        "content": "one\ntwo",
        "encoding": "utf-8",
    }
    assert backend.write("/workspace/u/new\udcfe/w\udcff", "written\n").error is None
    assert name_bytes(sandbox, "/workspace/u/new\udcfe") == ["77ff"]
    edited = backend.edit("/workspace/u/made\udcff", "two", "2")
    assert (edited.error, edited.occurrences) == (None, 1)
    assert sandbox.download_files(["/workspace/u/made\udcff"])[0].content == b"one\n2\n"
    assert backend.ls("/workspace/u/new\udcfe").entries == [
        {"path": "/workspace/u/new\udcfe/w\udcff", "is_dir": False}
    ]


def test_deepagents_glob_and_grep_find_undecodable_names(backend):
    backend.write("/workspace/u/d\udcff/g\udcff.txt", "needle\n")
    found = backend.glob("**/*\udcff.txt", "/workspace/u").matches
    assert found == [{"path": "/workspace/u/d\udcff/g\udcff.txt", "is_dir": False}]
    wanted = [{"path": "/workspace/u/d\udcff/g\udcff.txt", "line": 1, "text": "needle"}]
    assert backend.grep("needle", "/workspace/u").matches == wanted
    assert backend.grep("needle", "/workspace/u", "d\udcff/*.txt").matches == wanted


def test_deepagents_grep_in_and_delete_of_an_undecodable_path(backend):
    backend.write("/workspace/u/x\udcff", "needle\n")
    assert backend.grep("needle", "/workspace/u/x\udcff").matches == [
        {"path": "/workspace/u/x\udcff", "line": 1, "text": "needle"}
    ]
    assert backend.delete("/workspace/u/x\udcff").error is None
    assert backend.ls("/workspace/u").entries == []


def test_deepagents_async_tools_keep_the_names_too(backend):
    async def run() -> None:
        assert (await backend.awrite("/workspace/u/a\udcff", "async\n")).error is None
        listed = await backend.als("/workspace/u")
        assert listed.entries == [{"path": "/workspace/u/a\udcff", "is_dir": False}]
        assert (await backend.aread("/workspace/u/a\udcff")).file_data["content"] == "async"
        assert (await backend.aedit("/workspace/u/a\udcff", "async", "done")).error is None
        assert (await backend.aglob("a*", "/workspace/u")).matches == listed.entries
        found = await backend.agrep("done", "/workspace/u")
        assert [m["path"] for m in found.matches or []] == ["/workspace/u/a\udcff"]

    asyncio.run(run())


@pytest.mark.parametrize(
    "call",
    [
        lambda b: b.ls("/workspace/\ud800"),
        lambda b: b.read("/workspace/\ud800"),
        lambda b: b.write("/workspace/\ud800", "x"),
        lambda b: b.write("/workspace/u/x", "\ud800"),
        lambda b: b.edit("/workspace/\ud800", "a", "b"),
        lambda b: b.delete("/workspace/\ud800"),
        lambda b: b.glob("\ud800", "/workspace"),
        lambda b: b.grep("\ud800", "/workspace"),
    ],
)
def test_deepagents_tools_answer_a_name_no_bytes_stand_for_with_an_error(backend, call):
    result = call(backend)
    assert result.error and "stands for no byte" in result.error


def test_graphton_lists_reads_writes_and_deletes_undecodable_names(
    sandbox,
    folders,
    graphton_python,  # noqa: F811
):
    make_by_bytes(sandbox, "l\\377")
    sandbox.exec(["mkdir", "/workspace/u/d\udcff"])
    args = {"project": str(ROOT), "tmp": str(folders), "memory": MEMORY}
    args |= {"name": sandbox.name, "labels": TEST_LABELS}
    done = subprocess.run(
        [str(graphton_python), "-c", GRAPHTON_DRIVER, json.dumps(args)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert (seen["listed"], seen["read"]) == (["d\udcff", "l\udcff"], "by bytes")
    assert seen["is_dir"] == [True, False]
    assert seen["deleted"] == "Deleted 'u/l\udcff'"
    assert seen["after"] == ["d\udcff", "w\udcff"]
    assert seen["no_byte"].startswith("OSError") and "stands for no byte" in seen["no_byte"]
    assert name_bytes(sandbox) == ["64ff", "77ff"]
