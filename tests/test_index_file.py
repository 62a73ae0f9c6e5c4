"""The file where serving processes keep their index entries between starts
(`server.index_file`): private, valid only for the fingerprint that wrote it, and a removed or
replaced entry leaves no byte of what it held."""

from __future__ import annotations

from pathlib import Path

from server.index_file import NAME, IndexFile, SavedEntry

NAMED = SavedEntry("s1", "v1", '["DOE^JANE", "case DOE"]', b"DOE^JANE summary")


def _same(entry: SavedEntry) -> SavedEntry:
    return entry


def _bytes_of(folder: Path) -> bytes:
    return b"".join(p.read_bytes() for p in folder.iterdir() if p.is_file())


def test_entries_round_trip_per_kind_and_fingerprint(tmp_path: Path) -> None:
    saved = IndexFile.open(str(tmp_path / "state"), "code A")
    assert saved is not None
    other = SavedEntry("s2", "v9", "[]", b"\x00\xff")
    saved.save("listing", [NAMED, other], [])
    saved.save("series", [other], [])
    assert sorted(saved.load("listing", _same)) == ["s1", "s2"]
    assert saved.load("series", _same) == {"s2": other}
    saved.close()
    again = IndexFile.open(str(tmp_path / "state"), "code A")
    assert again is not None and again.load("listing", _same)["s1"] == NAMED
    again.close()
    newer = IndexFile.open(str(tmp_path / "state"), "code B")  # other code: nothing read
    assert newer is not None and newer.load("listing", _same) == {}
    assert newer.load("series", _same) == {}
    newer.close()
    assert b"DOE^JANE" not in _bytes_of(tmp_path / "state")  # and dropped at open
    folder = tmp_path / "state"
    assert folder.stat().st_mode & 0o077 == 0 and (folder / NAME).stat().st_mode & 0o077 == 0


def test_a_removed_or_replaced_entry_leaves_none_of_its_bytes(tmp_path: Path) -> None:
    """SQLite leaves deleted rows in free pages and in its write-ahead log: a slide removed (or
    re-published de-identified) kept its patient's name in the file."""
    folder = tmp_path / "state"
    saved = IndexFile.open(str(folder), "code")
    assert saved is not None
    saved.save("listing", [NAMED, SavedEntry("s3", "v1", '["other"]', b"x" * 5000)], [])
    assert b"DOE^JANE" in _bytes_of(folder)
    renamed = SavedEntry("s1", "v2", '["Slide s1"]', b"de-identified")
    saved.save("listing", [renamed], [])
    assert b"DOE^JANE" not in _bytes_of(folder)
    saved.save("listing", [SavedEntry("s4", "v1", '["SMITH^JOHN"]', b"y")], [])
    saved.save("listing", [], ["s4"])
    assert b"SMITH^JOHN" not in _bytes_of(folder)
    assert set(saved.load("listing", _same)) == {"s1", "s3"}
    saved.close()


def test_a_folder_that_cannot_be_made_is_no_file(tmp_path: Path) -> None:
    (tmp_path / "a file").write_text("")
    assert IndexFile.open(str(tmp_path / "a file" / "state"), "code") is None
