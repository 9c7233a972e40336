"""A real S3-compatible server (versitygw over a folder) that keeps its objects across restarts.

Objects are plain files under ``data/`` (buckets are folders) and their metadata lives in a
sidecar folder, so the server needs no extended attributes and a restart on the same port serves
exactly what was written before.
"""

from __future__ import annotations

import secrets
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import build, procs

REGION = "us-east-1"


@dataclass
class S3Server:
    """One versitygw process bound to a free loopback port; stop() and start() keep port and data."""

    folder: Path
    access_key: str = field(default_factory=lambda: "fedtune" + secrets.token_hex(4))
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    region: str = REGION
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 30.0) -> S3Server:
        """Start the server (on the port it had before, if any) and wait until it answers."""
        if self.running:
            return self
        self.port = self.port or procs.free_port()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        (self.folder / "meta").mkdir(parents=True, exist_ok=True)
        self.proc = procs.start(
            [
                str(build.binaries()["versitygw"]),
                f"--port=127.0.0.1:{self.port}",
                f"--access={self.access_key}",
                f"--secret={self.secret_key}",
                f"--region={self.region}",
                "posix",
                f"--sidecar={self.folder / 'meta'}",
                str(self.data_dir),
            ],
            self.folder / "versitygw.log",
        )

        def answering() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                tail = (self.folder / "versitygw.log").read_text(errors="replace")[-2000:]
                raise procs.Fatal(f"versitygw exited with {self.proc.returncode}:\n{tail}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
            except urllib.error.HTTPError:
                return True  # an S3 error document (access denied) means it is serving
            return True

        procs.wait_for(answering, timeout, "the S3 server")
        return self

    def stop(self) -> None:
        procs.stop(self.proc, grace=5.0)
        self.proc = None

    def restart(self) -> S3Server:
        self.stop()
        return self.start()

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )

    def create_bucket(self, name: str) -> str:
        """Create a bucket unless it exists; returns its name."""
        s3 = self.client()
        try:
            s3.head_bucket(Bucket=name)
        except Exception:
            s3.create_bucket(Bucket=name)
        return name

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point an S3 client at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ENDPOINT_URL_S3": self.endpoint,
        }
