"""Build planning that needs no engine: hashing, ignore rules, args, failure hints, and
the record of the images a build made."""

import io
import os
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from stigmer_sandbox import __version__, images
from stigmer_sandbox.errors import BuildError, SandboxError, UsageError
from stigmer_sandbox.images import builder, inventory
from stigmer_sandbox.images.record import ImageRecord


def context(tmp_path: Path) -> Path:
    (tmp_path / "Dockerfile.sandbox.basic").write_text("FROM x\n")
    (tmp_path / "requirements.txt").write_text("pyyaml==6.0.1\n")
    (tmp_path / "certs").mkdir()
    (tmp_path / "certs" / "README.md").write_text("drop certs here")
    (tmp_path / "certs" / "corp.crt").write_text("pem")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "x.pyc").write_text("junk")
    (tmp_path / ".dockerignore").write_text("**/__pycache__\ncerts/*\n!certs/*.crt\n")
    return tmp_path


def names(files, root):
    return sorted(p.relative_to(root).as_posix() for p in files)


def test_dockerignore_is_honoured(tmp_path):
    root = context(tmp_path)
    files = images.context_files(root, "Dockerfile.sandbox.basic")
    assert names(files, root) == [
        ".dockerignore",
        "Dockerfile.sandbox.basic",
        "certs/corp.crt",
        "requirements.txt",
    ]


def digest(root, **changes):
    files = images.context_files(root, "Dockerfile.sandbox.basic")
    args = {
        "hashed_args": {"A": "1"},
        "base_id": "sha256:base",
        "extra_ca": b"",
        "target": None,
        **changes,
    }
    return images.content_hash(root, files, **args)


def test_hash_is_stable_and_sensitive_to_every_input(tmp_path):
    root = context(tmp_path)
    first = digest(root)
    assert digest(root) == first
    assert digest(root, base_id="sha256:other") != first
    assert digest(root, hashed_args={"A": "2"}) != first
    assert digest(root, extra_ca=b"pem") != first
    assert digest(root, target="base") != first
    (root / "requirements.txt").write_text("pyyaml==6.0.2\n")
    assert digest(root) != first


def test_ignored_files_do_not_change_the_hash(tmp_path):
    root = context(tmp_path)
    first = digest(root)
    (root / "__pycache__" / "y.pyc").write_text("more junk")
    (root / "certs" / "README.md").write_text("edited")
    assert digest(root) == first


def test_context_tar_ignores_owner_mode_and_time_like_git(tmp_path):
    """The builder's COPY cache keys on owner and mode: two clones must send equal bytes."""
    tars = []
    for index, (uid, mode) in enumerate([(0, 0o644), (1234, 0o664)]):
        (tmp_path / str(index)).mkdir()
        root = context(tmp_path / str(index))
        script = root / "run.sh"
        script.write_text("#!/bin/sh\n")
        script.chmod(0o755 if uid == 0 else 0o775)
        (root / "requirements.txt").chmod(mode)
        for path in root.rglob("*"):
            os.lchown(path, uid, uid)
            os.utime(path, (index * 1000, index * 1000), follow_symlinks=False)
        files = images.context_files(root, "Dockerfile.sandbox.basic")
        tars.append(images.context_tar(root, files).getvalue())
    assert tars[0] == tars[1]
    with tarfile.open(fileobj=io.BytesIO(tars[0])) as archive:
        modes = {member.name: member.mode for member in archive.getmembers()}
    assert modes["run.sh"] == 0o755 and modes["requirements.txt"] == 0o644


def test_build_args_and_tags():
    assert images.parse_build_args(["A=1", "B=x=y"]) == {"A": "1", "B": "x=y"}
    for bad in (["A"], ["=1"], ["1A=2"]):
        with pytest.raises(UsageError):
            images.parse_build_args(bad)
    assert images.default_tags("basic") == (
        "stigmer-sandbox-basic:local",
        f"stigmer-sandbox-basic:v{__version__}",
    )
    assert images.default_tags("basic", "base")[0] == "stigmer-sandbox-base:local"


def test_proxy_variables_pass_through_in_both_cases():
    args = images.proxy_args({"https_proxy": "http://proxy:3128", "NO_PROXY": "localhost"})
    assert args["HTTPS_PROXY"] == args["https_proxy"] == "http://proxy:3128"
    assert args["NO_PROXY"] == "localhost"


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("Temporary failure resolving 'deb.example'", "no network"),
        ("SSL: CERTIFICATE_VERIFY_FAILED", "--ca-cert"),
        ("write error: no space left on device", "disk is full"),
        ("ERROR: tool kubectl: checksum mismatch for x", "pinned checksum"),
        ("npm ERR! code EINTEGRITY", "pinned checksum"),
    ],
)
def test_failure_hints(line, fragment):
    assert fragment in images.diagnose(["step output", line])


def test_unknown_failure_has_no_hint():
    assert images.diagnose(["exit code 2"]) is None


def test_skip_tool_names_are_validated():
    root = Path(__file__).resolve().parents[2] / "dockerfiles"
    assert images.check_skipped(root, ["helm", "kubectl", "helm"]) == "helm,kubectl"
    with pytest.raises(UsageError, match="known tools"):
        images.check_skipped(root, ["kubeclt"])


def test_report_groups_packages_into_components():
    grouped = inventory.group_packages("gcc-12\t100\npython3.11\t10\ngit\t5\nlibc6\t1\n")
    assert grouped == {"toolchain": 102400, "python": 10240, "git + perl": 5120, "base": 1024}


class QuietWatcher:
    """A build watcher that keeps only the notes."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)

    def step(self, number: int, total: int, instruction: str) -> None:
        pass

    def line(self, text: str) -> None:
        pass


def test_builder_stream_yields_every_image_a_step_produced_or_reused():
    stream = [
        {"stream": "Step 1/3 : FROM stigmer-sandbox-debian:bookworm-slim AS node\n"},
        {"stream": " ---> 603d51b9eda2\n"},
        {"stream": "Step 2/3 : RUN true\n"},
        {"stream": " ---> Using cache\n ---> f6a62d74dedd\n"},
        {"stream": "Step 3/3 : LABEL x=1\n"},
        {"stream": " ---> Running in 0a1b2c3d4e5f\n"},
        {"stream": "Removing intermediate container 0a1b2c3d4e5f\n ---> 612b53605990\n"},
        {"aux": {"ID": "sha256:612b53605990" + "0" * 52}},
    ]
    produced: list[str] = []
    run = builder._follow(iter(stream), QuietWatcher(), produced)
    assert run == ("sha256:612b53605990" + "0" * 52, 3, 1)
    assert produced == ["603d51b9eda2", "f6a62d74dedd", "612b53605990", run.image_id]


def test_a_failed_build_still_records_the_images_of_its_finished_steps(tmp_path, monkeypatch):
    stream = [
        {"stream": "Step 1/2 : FROM stigmer-sandbox-basic:local\n"},
        {"stream": " ---> 612b53605990\n"},
        {"stream": "Step 2/2 : RUN exit 3\n"},
        {"error": "The command '/bin/sh -c exit 3' returned a non-zero code: 3"},
    ]
    api = SimpleNamespace(build=lambda **_request: iter(stream))
    monkeypatch.setattr(builder.engine, "client", lambda: SimpleNamespace(api=api))
    store = ImageRecord(tmp_path / "images.jsonl")
    with pytest.raises(BuildError, match=r"step 2/2 \(RUN exit 3\)"):
        builder._build_recorded(store, "basic", QuietWatcher(), tag="x:1")
    assert store.ids() == {"612b53605990"}


def test_image_record_appends_one_line_per_build_and_reads_short_ids(tmp_path):
    store = ImageRecord(tmp_path / "state" / "images.jsonl")
    assert store.ids() == frozenset()
    store.add("basic", ["sha256:612B53605990" + "0" * 52, "f6a62d74dedd", ""])
    store.add("base", ["603d51b9eda2"])
    store.add("basic", [])
    assert len(store.path.read_text().splitlines()) == 2
    assert store.ids() == {"612b53605990", "f6a62d74dedd", "603d51b9eda2"}


def test_image_record_ignores_lines_that_are_not_records(tmp_path):
    store = ImageRecord(tmp_path / "images.jsonl")
    store.path.write_text('not json\n[1]\n{"ids": "612b53605990"}\n{"ids": [1, "f6a62d74dedd"]}\n')
    assert store.ids() == {"f6a62d74dedd"}


def test_unreadable_image_record_is_one_clear_error(tmp_path):
    store = ImageRecord(tmp_path / "images.jsonl")
    store.path.mkdir()  # reading a folder fails whoever runs the test, root included
    with pytest.raises(SandboxError, match="cannot read the image record"):
        store.ids()


def test_a_build_the_record_cannot_take_still_succeeds_with_a_note(tmp_path):
    watcher = QuietWatcher()
    blocked = tmp_path / "file"
    blocked.write_text("")
    builder._record(ImageRecord(blocked / "images.jsonl"), "basic", ["sha256:ab"], watcher)
    assert "could not record the build" in watcher.notes[0]
