from fsspec.implementations.local import LocalFileSystem

from shipyard import storage
from shipyard.config import Settings


def test_local_paths_and_file_uris(tmp_path):
    for uri in (str(tmp_path), f"file://{tmp_path}"):
        fs, path = storage.filesystem(uri)
        assert isinstance(fs, LocalFileSystem) and path == str(tmp_path)


def test_s3_uses_endpoint_from_settings():
    settings = Settings.from_env({"SHIPYARD_S3_ENDPOINT": "http://127.0.0.1:9"})
    fs, path = storage.filesystem("s3://bucket/some/prefix/", settings)
    assert path == "bucket/some/prefix"
    assert fs.client_kwargs["endpoint_url"] == "http://127.0.0.1:9"


def test_unknown_scheme_is_named():
    import pytest

    with pytest.raises(ValueError, match="gs://b/x: unsupported URI scheme 'gs'"):
        storage.filesystem("gs://b/x")
