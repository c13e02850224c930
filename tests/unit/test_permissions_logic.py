"""fix-permissions without an engine: the helper's command and what it prints."""

from pathlib import Path

from stigmer_sandbox.host import permissions


def test_the_helper_walks_with_find_p_and_judges_each_entry_by_descriptor():
    command = permissions.helper_command(1000, 1001, dry_run=True)
    assert command[:3] == ["sh", "-c", 'find -P "$1" -print0 | perl -e "$2" "$3" "$4" "$5"']
    assert command[4:] == [permissions.TARGET, permissions.JUDGE, "1000", "1001", "1"]
    assert "O_PATH | O_NOFOLLOW" in permissions.JUDGE and "$st[3] > 1" in permissions.JUDGE


def test_helper_output_gives_the_count_and_the_skipped_files_as_host_paths():
    folder = Path("/home/me/ws")
    output = "/target/a/hard\0/target/odd\nname\x007\n"
    count, skipped = permissions.parse_output(folder, output)
    assert count == 7
    assert skipped == (folder / "a" / "hard", folder / "odd\nname")
    assert permissions.parse_output(folder, "") == (0, ())


def test_skipped_line_names_the_first_files_and_counts_the_rest():
    folder = Path("/ws")
    many = tuple(folder / f"f{n}" for n in range(permissions.SHOWN_SKIPPED + 3))
    line = permissions.OwnershipChange(folder, 1, "", many).skipped_line()
    assert line.startswith(f"left {len(many)} hard-linked files as they are")
    assert "/ws/f0" in line and line.endswith("and 3 more")
    assert permissions.OwnershipChange(folder, 1, "").skipped_line() == ""
