"""An S3-compatible server for the object-storage tests: moto's standalone server, a real HTTP
server in its own process on 127.0.0.1 (no in-process mock of S3)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from bench.s3 import moto_server


@dataclass(frozen=True)
class S3Server:
    """Where the server listens, and how a client reaches it."""

    env: dict[str, str]  # the standard AWS environment variables that point any client at it

    @property
    def endpoint(self) -> str:
        return self.env["AWS_ENDPOINT_URL"]

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for this server."""
        return {
            "key": self.env["AWS_ACCESS_KEY_ID"],
            "secret": self.env["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": self.endpoint},
        }

    def bucket(self) -> str:
        """A new empty bucket's name."""
        import s3fs

        name = f"b-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True).mkdir(name)
        return name


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    with moto_server() as env:
        yield S3Server(env)


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server, with the AWS environment variables pointing at it for this test."""
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    return s3_server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `cuda` need a CUDA device: skipped without one. torch is imported only if
    some test asks, so the analysis tests run where it is not installed."""
    cuda = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda:
        return
    import torch

    if not torch.cuda.is_available():
        for item in cuda:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
