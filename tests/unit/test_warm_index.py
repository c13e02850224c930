"""Where a plain `stigmer-sandbox run` finds its relay without loading the settings: the
note's key changes with every input of the settings, and only a private folder is read."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from stigmer_sandbox import warm_index


@pytest.fixture
def private_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    for name in list(os.environ):
        if name.startswith(warm_index.ENV_PREFIXES):
            monkeypatch.delenv(name)
    return tmp_path


def test_a_note_is_found_for_the_same_inputs_and_forgotten(private_tmp):
    project = private_tmp / "project"
    project.mkdir()
    warm_index.remember("/s/relay.sock", "abc", 30.0, str(project))
    assert warm_index.lookup(str(project)) == ("/s/relay.sock", "abc", 30.0)
    assert oct(os.stat(warm_index.folder()).st_mode & 0o777) == "0o700"
    warm_index.forget(str(project))
    assert warm_index.lookup(str(project)) is None


def test_every_input_of_the_settings_changes_the_key(private_tmp, monkeypatch):
    project = private_tmp / "project"
    project.mkdir()
    before = warm_index.key(str(project))
    (project / "invoke.yaml").write_text("stigmer: {timeout: 5}\n")
    with_file = warm_index.key(str(project))
    assert with_file != before
    (project / "invoke.yaml").write_text("stigmer: {timeout: 50}\n")
    assert warm_index.key(str(project)) != with_file  # another size
    monkeypatch.setenv("INVOKE_STIGMER_IMAGE", "other:tag")
    assert warm_index.key(str(project)) not in (before, with_file)
    monkeypatch.setenv("DOCKER_HOST", "tcp://elsewhere:2375")
    changed = warm_index.key(str(project))
    monkeypatch.setenv("UNRELATED", "x")
    assert warm_index.key(str(project)) == changed  # only what settings are read from
    assert warm_index.key(str(private_tmp)) != changed  # another folder


def test_a_folder_others_can_enter_or_a_bad_note_is_never_read(private_tmp):
    project = str(private_tmp)
    warm_index.remember("/s/relay.sock", "abc", 30.0, project)
    os.chmod(warm_index.folder(), 0o755)
    assert warm_index.lookup(project) is None
    os.chmod(warm_index.folder(), 0o700)
    note = os.path.join(warm_index.folder(), warm_index.key(project) + ".json")
    for text in ("not json", '{"socket": 1, "fingerprint": "a", "timeout": 1}', "[]"):
        with open(note, "w", encoding="utf-8") as file:
            file.write(text)
        assert warm_index.lookup(project) is None


def test_the_console_scripts_first_imports_stay_light():
    probe = (
        "import sys; import stigmer_sandbox.cli; "
        "import json; print(json.dumps([m for m in ('dataclasses', 'colorama', 'yaml', "
        "'invoke', 'docker', 'stigmer_sandbox.config', 'stigmer_sandbox.console') "
        "if m in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == []
