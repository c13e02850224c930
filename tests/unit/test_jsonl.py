"""The JSON-lines files (audit trail, logs): whole lines, the folder made on first use."""

from __future__ import annotations

import json
import os
import threading

from stigmer_sandbox import jsonl


def test_the_first_entry_makes_the_folder_and_every_entry_is_one_whole_line(tmp_path):
    path = tmp_path / "a" / "b" / "audit.jsonl"

    def write(worker: int) -> None:
        for index in range(50):
            jsonl.append(path, {"worker": worker, "index": index, "pad": "x" * 3000})

    threads = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 400 and all(json.loads(line)["pad"] for line in lines)
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
