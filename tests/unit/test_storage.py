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


def test_s3_options_are_picklable_and_stable_so_instances_are_shared():
    import pickle

    from shipyard.s3_retries import CountingHTTPSession

    settings = Settings.from_env({"SHIPYARD_S3_ENDPOINT": "http://127.0.0.1:9"})
    opts = storage.storage_options("s3://bucket/x", settings)
    assert opts["config_kwargs"]["http_session_cls"] is CountingHTTPSession
    assert pickle.loads(pickle.dumps(opts)) == opts  # DCP's fsspec writer may be pickled
    assert str(opts) == str(storage.storage_options("s3://bucket/y", settings))  # s3fs's cache key
    fs, _ = storage.filesystem("s3://bucket/x", settings)
    assert storage.filesystem("s3://bucket/y", settings)[0] is fs
    assert pickle.loads(pickle.dumps(fs)) is fs
