"""What a node compares in the shared-storage check (the check itself runs on a real multi-node cluster in
``test_multinode.py``)."""

from __future__ import annotations

from hqlabel.jobs.shared_paths import fingerprint, unseen


def test_fingerprints_tell_files_and_folders_apart(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.png").write_bytes(b"1234")
    seen = {str(tmp_path / "data"): fingerprint(str(tmp_path / "data"))}
    seen[str(tmp_path / "data" / "a.png")] = fingerprint(str(tmp_path / "data" / "a.png"))
    assert seen[str(tmp_path / "data" / "a.png")] == ("file", 4)
    assert unseen(seen) == []
    (tmp_path / "data" / "b.png").write_bytes(b"")  # another node's copy with one more file
    assert unseen(seen) == [str(tmp_path / "data")]
    (tmp_path / "data" / "a.png").write_bytes(b"12")  # and another size
    assert unseen(seen) == [str(tmp_path / "data"), str(tmp_path / "data" / "a.png")]
    assert fingerprint(str(tmp_path / "missing")) is None
    assert unseen({str(tmp_path / "missing"): ("file", 1)}) == [str(tmp_path / "missing")]
