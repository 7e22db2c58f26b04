"""The tar header index (pipeline.tars) and the source stage's WebDataset reader built on it."""

from __future__ import annotations

import gzip
import tarfile
from pathlib import Path

import pytest

from saferclip_data.pipeline.tars import NotPlainTar, TarDamage, scan_tar
from saferclip_data.stages import readers

from helpers import write_tar

SAMPLES = [("a.jpg", b"\xff\xd8" + b"1" * 700), ("a.txt", b"one"), ("a.json", b'{"group": "g"}'), ("dir/", b""),
           ("dir/b.jpg", b"2" * 513), ("dir/b.TXT", b"two"), ("p/" * 60 + "c.txt", b"three"),
           ("ü.txt", b"vier"), ("k" * 120 + ".txt", b"five"), ("e.jpg", b""), ("e.txt", b"six")]  # fmt: skip


def _tarfile_index(path: Path) -> list[tuple[str, int, int]]:
    with tarfile.open(path) as tar:
        return [(m.name, m.offset_data, m.size) for m in tar.getmembers() if m.isfile()]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_the_index_lists_what_tarfile_lists(tmp_path, fmt):
    members = SAMPLES if fmt == tarfile.PAX_FORMAT else [m for m in SAMPLES if m[0].isascii() and len(m[0]) < 100]
    path = write_tar(tmp_path / "t.tar", members, fmt)
    index, damage = scan_tar(path)
    assert damage is None
    assert index == _tarfile_index(path)
    assert len(index) == len(members) - 1  # the folder is not a file
    whole = path.read_bytes()
    assert [whole[start : start + size] for _, start, size in index] == [d for n, d in members if n != "dir/"]


def test_tars_the_index_does_not_read_go_to_tarfile(tmp_path):
    plain = write_tar(tmp_path / "plain.tar", SAMPLES[:3])
    compressed = tmp_path / "t.tar.gz"
    compressed.write_bytes(gzip.compress(plain.read_bytes()))
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "noise.tar").write_bytes(bytes(range(1, 256)) * 8)
    odd = [
        compressed,
        write_tar(tmp_path / "gnu.tar", [("k" * 120 + ".txt", b"x")], tarfile.GNU_FORMAT),  # a GNU long name
        write_tar(tmp_path / "link.tar", [("a.txt", b"x"), ("b.txt@link", b"")]),
        tmp_path / "noise.tar",  # no valid header
    ]
    for path in odd:
        with pytest.raises(NotPlainTar):
            scan_tar(path)
    # the source reader still reads them, through tarfile
    table, _ = readers.read_webdataset_tar(compressed, [])
    assert table["caption"].to_pylist() == ["one"] and table["_reason"].to_pylist() == [None]
    # an empty file is a truncated tar, not one to hand on
    assert scan_tar(tmp_path / "empty.tar") == (
        [],
        TarDamage(0, None, "truncated", "truncated tar (0 bytes, less than one header)"),
    )
    table, _ = readers.read_webdataset_tar(tmp_path / "empty.tar", [])
    assert table["key"].to_pylist() == ["empty_unreadable_after_start"]
    assert table["_reason"].to_pylist() == ["truncated tar member"]


def test_every_cut_of_a_tar_is_found_and_what_precedes_it_is_kept(tmp_path):
    path = write_tar(tmp_path / "t.tar", SAMPLES)
    whole = path.read_bytes()
    full, _ = scan_tar(path)
    last_name, last_start, last_size = full[-1]
    data_end = last_start + (last_size + 511) // 512 * 512  # the last member's padded end: what must be there
    cut_path = tmp_path / "cut.tar"
    for cut in range(1, len(whole), 37):
        cut_path.write_bytes(whole[:cut])
        index, damage = scan_tar(cut_path)
        assert index == full[: len(index)]  # what comes before the break, as it is
        if cut < data_end:
            assert damage is not None and damage.kind == "truncated", cut
            assert all(start + size <= cut for _, start, size in index)
            if damage.member is not None:  # the member whose data the cut falls in
                name, start, size = full[len(index)]
                assert damage.member == name and start <= cut < start + size + 512
        elif cut % 512 == 0:  # whole blocks, end-of-archive blocks missing or short: tarfile reads it too
            assert damage is None and index == full


def test_a_damaged_header_is_reported_where_tarfile_stops_quietly(tmp_path):
    path = write_tar(tmp_path / "t.tar", SAMPLES[:3])
    full, _ = scan_tar(path)
    with tarfile.open(path) as tar:
        second_header = tar.getmembers()[1].offset  # its pax header, which comes first
    damaged = bytearray(path.read_bytes())
    damaged[second_header + 10] ^= 0x55  # a byte of the name: the checksum no longer matches
    (tmp_path / "bad.tar").write_bytes(bytes(damaged))
    index, damage = scan_tar(tmp_path / "bad.tar")
    assert index == full[:1]
    assert damage.kind == "damaged" and damage.member is None and str(second_header) in damage.message
    with tarfile.open(tmp_path / "bad.tar") as tar:  # why: tarfile lists one member and says nothing
        assert [m.name for m in tar.getmembers() if m.isfile()] == ["a.jpg"]
    table, _ = readers.read_webdataset_tar(tmp_path / "bad.tar", [])
    assert table["key"].to_pylist() == ["a", "bad_unreadable_after_a"]
    assert table["_reason"].to_pylist() == [None, "damaged tar member"]


def test_the_source_reader_reads_the_same_records_through_the_index_and_through_tarfile(tmp_path, monkeypatch):
    """The index is the fast path; tarfile the fallback. On whole tars both give the same table; on a tar cut
    anywhere, the records before the break are the same and the break is one record with a reason."""
    path = write_tar(tmp_path / "t.tar", SAMPLES)
    fast, _ = readers.read_webdataset_tar(path, ["group"])
    assert fast["key"].to_pylist() == ["a", "dir_b", "p_" * 60 + "c", "_", "k" * 120, "e"]
    assert fast["caption"].to_pylist()[:2] == ["one", "two"] and fast["image"].to_pylist()[1] == b"2" * 513

    def refuse(path):
        raise NotPlainTar(path)

    slow = {}
    whole = path.read_bytes()
    last_name, last_start, last_size = scan_tar(path)[0][-1]
    cuts = [len(whole), *range(600, last_start + last_size, 211)]  # the whole tar, then cuts before its end
    with monkeypatch.context() as patched:
        patched.setattr(readers, "scan_tar", refuse)
        for cut in cuts:
            (tmp_path / f"c{cut}.tar").write_bytes(whole[:cut])
            slow[cut] = readers.read_webdataset_tar(tmp_path / f"c{cut}.tar", ["group"])[0]
    assert slow[len(whole)].equals(fast)
    assert readers._indexed_members(path) == readers._tarfile_members(path)
    for cut in cuts[1:]:
        ours = readers.read_webdataset_tar(tmp_path / f"c{cut}.tar", ["group"])[0].to_pylist()
        theirs = slow[cut].to_pylist()
        good = [r for r in ours if r["_reason"] is None]
        assert [r["_reason"] for r in ours[len(good) :]] == ["truncated tar member"], cut  # one record, last
        # tarfile's records before the break are ours; where the cut falls in a header, tarfile stops quietly
        assert good == [r for r in theirs if r["_reason"] is None][: len(good)]
        assert len(ours) >= len(theirs)
