"""The official-weights download path, against an HTTP server on 127.0.0.1."""
import dataclasses
import hashlib

import pytest

from pipeline.io import download
from pipeline.variants import VARIANTS, Weights

PAYLOAD = b"repvit weights " * 4096


@pytest.fixture
def server(loopback):
    """Serves PAYLOAD at /w.pth on loopback."""
    loopback["files"]["/w.pth"] = PAYLOAD
    loopback["url"] = loopback["base"] + "/w.pth"
    return loopback


def variant_with(**weights):
    return dataclasses.replace(VARIANTS["m0.9"], weights=Weights("w.pth", **weights))


def test_download_verify_and_never_again(server, tmp_path):
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    v = variant_with(size=len(PAYLOAD), sha256=digest)
    path, got = download.fetch_official(v, url=server["url"], directory=tmp_path)
    assert path.read_bytes() == PAYLOAD and got == digest and server["requests"] == 1
    path2, _ = download.fetch_official(v, url=server["url"], directory=tmp_path)
    assert path2 == path and server["requests"] == 1, "a verified file is never fetched again"
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"], "no partial files left"


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    v = variant_with(sha256="0" * 64)
    with pytest.raises(download.DownloadCorrupt, match="sha256"):
        download.fetch_official(v, url=server["url"], directory=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_size_pin_catches_truncation(server, tmp_path):
    server["files"]["/w.pth"] = PAYLOAD[:1000]
    v = variant_with(size=len(PAYLOAD))
    with pytest.raises(download.DownloadCorrupt, match="truncated"):
        download.fetch_official(v, url=server["url"], directory=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_prefix_pin(server, tmp_path):
    prefix = hashlib.sha256(PAYLOAD).hexdigest()[:16]
    download.fetch_official(variant_with(sha256_prefix=prefix), url=server["url"], directory=tmp_path)
    with pytest.raises(download.DownloadCorrupt, match="prefix"):
        download.fetch_official(variant_with(sha256_prefix="ffff" * 4), url=server["url"],
                                directory=tmp_path / "other")


def test_first_download_records_sha256_then_verifies(server, tmp_path):
    v = variant_with()
    path, digest = download.fetch_official(v, url=server["url"], directory=tmp_path)
    assert (tmp_path / "w.pth.sha256").read_text().strip() == digest
    path.write_bytes(b"tampered")
    # The cached file fails its recorded digest: it is fetched again and verified.
    download.fetch_official(v, url=server["url"], directory=tmp_path)
    assert path.read_bytes() == PAYLOAD and server["requests"] == 2


def test_no_network_says_how_to_pass_a_file(server, tmp_path):
    url = server["url"].replace("/w.pth", "/missing.pth")
    with pytest.raises(download.DownloadUnavailable, match=r"CKPT=/path/to/w\.pth"):
        download.fetch_official(variant_with(), url=url, directory=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cache_dir_respects_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert download.cache_dir() == tmp_path / "repvit-pipeline" / "weights"


def test_every_variant_has_a_release_url():
    for v in VARIANTS.values():
        if v.legacy:   # the first version's files, released under the repository's earlier name
            assert v.weights.url.startswith("https://github.com/jameslahm/RepViT/releases/download/v1.0/")
            assert v.weights.url.endswith("_distill_300.pth")
        else:
            assert v.weights.url.startswith("https://github.com/THU-MIG/RepViT/releases/download/v1.0/")
            assert v.weights.url.endswith("_distill_300e.pth")
