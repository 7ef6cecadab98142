"""storage: local atomic writes, and the S3 protocol against moto's server on loopback."""

from pathlib import Path

import pytest

from refine_af import storage

# --- local -------------------------------------------------------------------------------


def test_local_round_trip_creates_parent_folders(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "out.txt"
    storage.write_text(target, "héllo")
    assert storage.read_text(target) == "héllo"
    assert storage.read_bytes(target) == "héllo".encode()
    assert storage.exists(target)
    assert list(target.parent.iterdir()) == [target]  # no temporary left behind


def test_failed_atomic_write_leaves_original_and_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    target.write_text("original")
    with pytest.raises(RuntimeError, match="writer crashed"), storage.atomic_path(target) as tmp:
        tmp.write_text("half a reco")
        raise RuntimeError("writer crashed")
    assert target.read_text() == "original"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_path_accepts_a_folder_written_by_a_library(tmp_path: Path) -> None:
    target = tmp_path / "model"
    with storage.atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "weights.bin").write_bytes(b"\x00")
    assert (target / "weights.bin").read_bytes() == b"\x00"


def test_missing_local_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    assert not storage.exists(missing)
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        storage.read_text(missing)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [("s3://bucket/a/b.txt", ("bucket", "a/b.txt")), ("s3://bucket", ("bucket", ""))],
)
def test_split_s3(uri: str, expected: tuple[str, str]) -> None:
    assert storage.is_s3(uri)
    assert storage.split_s3(uri) == expected


@pytest.mark.parametrize("uri", ["s3:/bucket/key", "s3://", "s3://Bad_Bucket/key", "/local"])
def test_split_s3_rejects_malformed(uri: str) -> None:
    with pytest.raises(ValueError, match="s3"):
        storage.split_s3(uri)


# --- S3 (moto server) --------------------------------------------------------------------


@pytest.mark.integration
def test_s3_client_endpoint_from_env_and_botocore_retries(
    s3_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("S3_ENDPOINT_URL", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert storage.s3_client().meta.endpoint_url == s3_server
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_server.replace("127.0.0.1", "localhost"))
    client = storage.s3_client()
    assert client.meta.endpoint_url == s3_server.replace("127.0.0.1", "localhost")
    assert client.meta.config.retries == {
        "total_max_attempts": storage.S3_MAX_ATTEMPTS,
        "mode": "standard",
    }


@pytest.mark.integration
def test_s3_round_trip_and_exists(s3_bucket: str) -> None:
    base = f"s3://{s3_bucket}/run"
    storage.write_text(f"{base}/a.txt", "alpha")
    storage.write_bytes(f"{base}/sub/b.bin", b"\x01\x02")
    storage.write_text(f"s3://{s3_bucket}/run2/c.txt", "sibling, not under run/")

    assert storage.read_text(f"{base}/a.txt") == "alpha"
    assert storage.read_bytes(f"{base}/sub/b.bin") == b"\x01\x02"
    assert storage.exists(f"{base}/a.txt")
    assert not storage.exists(f"{base}/missing.txt")


@pytest.mark.integration
def test_s3_download_dir_mirrors_a_prefix(s3_bucket: str, tmp_path: Path) -> None:
    storage.write_text(f"s3://{s3_bucket}/models/m1/config.json", "{}")
    storage.write_bytes(f"s3://{s3_bucket}/models/m1/shards/0.safetensors", b"\x00" * 10)
    storage.write_text(f"s3://{s3_bucket}/models/m10/config.json", "a sibling, not under m1/")

    mirror = storage.download_dir(f"s3://{s3_bucket}/models/m1", tmp_path / "cache" / "m1")
    assert (mirror / "config.json").read_text() == "{}"
    assert (mirror / "shards" / "0.safetensors").read_bytes() == b"\x00" * 10
    assert sorted(p.name for p in mirror.rglob("*") if p.is_file()) == [
        "0.safetensors", "config.json",
    ]  # fmt: skip
    assert [p.name for p in mirror.parent.iterdir()] == ["m1"]  # no temporary left behind

    # A mirror already in place is kept: it never changes under a reader.
    storage.write_text(f"s3://{s3_bucket}/models/m1/config.json", '{"new": 1}')
    storage.download_dir(f"s3://{s3_bucket}/models/m1", mirror)
    assert (mirror / "config.json").read_text() == "{}"


@pytest.mark.integration
def test_s3_missing_key_bucket_and_prefix_name_the_uri(s3_bucket: str, tmp_path: Path) -> None:
    missing = f"s3://{s3_bucket}/no/such.txt"
    with pytest.raises(FileNotFoundError, match=missing):
        storage.read_text(missing)
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket-here/k"):
        storage.read_text("s3://no-such-bucket-here/k")
    with pytest.raises(FileNotFoundError, match=f"s3://{s3_bucket}/empty"):
        storage.download_dir(f"s3://{s3_bucket}/empty", tmp_path / "m")
