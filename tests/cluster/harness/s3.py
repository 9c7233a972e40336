"""A real S3-compatible server (versitygw over a folder) that keeps its objects across restarts.

Objects are plain files under ``data/`` (buckets are folders) and their metadata, bucket policies
included, lives in a sidecar folder, so the server needs no extended attributes and a restart on the
same port serves exactly what was written before. versitygw's internal IAM keeps its accounts in
``iam/users.json``, so the accounts made by ``add_account`` survive a restart as well.
"""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import urllib.error
import urllib.request
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import build, procs

REGION = "us-east-1"

# An account name is its access key id, which SigV4 carries in `Credential=<key>/<date>/...` and
# a bucket policy names bare, so it may hold neither "/" nor "*" (nor anything else odd).
_ACCOUNT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class AdminError(RuntimeError):
    """versitygw's admin API refused a call; `code` is its S3-style error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


@dataclass
class S3Server:
    """One versitygw process bound to a free loopback port; stop() and start() keep port and data."""

    folder: Path
    access_key: str = field(default_factory=lambda: "fedtune" + secrets.token_hex(4))
    secret_key: str = field(default_factory=lambda: secrets.token_hex(16))
    region: str = REGION
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    # Each bucket's policy statements, as every cluster sharing this server merged them in (merge_policy).
    _statements: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.folder / "data"

    @property
    def iam_dir(self) -> Path:
        return self.folder / "iam"

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
        self.iam_dir.mkdir(parents=True, exist_ok=True)
        self.proc = procs.start(
            [
                str(build.binaries()["versitygw"]),
                f"--port=127.0.0.1:{self.port}",
                f"--access={self.access_key}",
                f"--secret={self.secret_key}",
                f"--region={self.region}",
                # Internal IAM: accounts in iam/users.json, managed through the admin API that is
                # served on the S3 port itself (no --admin-port). No cache, so an account created or
                # changed is seen by the very next request.
                f"--iam-dir={self.iam_dir}",
                "--iam-cache-disable",
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

    def client(self, access: str | None = None, secret: str | None = None) -> Any:
        """A boto3 S3 client for this server: as root, or as the account whose keys are given."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=access or self.access_key,
            aws_secret_access_key=secret or self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 3}),
        )

    def _admin(self, path: str, body: bytes = b"") -> bytes:
        """One call to versitygw's admin API (PATCH /<path>, SigV4-signed as root, which is admin)."""
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        request = AWSRequest(method="PATCH", url=f"{self.endpoint}/{path}", data=body)
        S3SigV4Auth(Credentials(self.access_key, self.secret_key), "s3", self.region).add_auth(request)
        prepared = request.prepare()
        call = urllib.request.Request(prepared.url, data=body, method="PATCH", headers=dict(prepared.headers))
        try:
            with urllib.request.urlopen(call, timeout=30) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as exc:
            text = exc.read()
            try:
                fields = {_local(el.tag): el.text or "" for el in ET.fromstring(text)}
            except ET.ParseError:
                fields = {}
            raise AdminError(
                fields.get("Code", str(exc.code)), fields.get("Message", text.decode(errors="replace"))
            ) from exc

    def accounts(self) -> dict[str, tuple[str, str]]:
        """The IAM accounts other than root: access key id -> (secret, role)."""
        found: dict[str, tuple[str, str]] = {}
        for el in ET.fromstring(self._admin("list-users")).iter():
            fields = {_local(child.tag): child.text or "" for child in el}
            if "Access" in fields and "Secret" in fields:
                found[fields["Access"]] = (fields["Secret"], fields.get("Role", ""))
        return found

    def add_account(self, name: str) -> tuple[str, str]:
        """Create (idempotently) the plain user account `name`; returns (access_key, secret_key).

        versitygw's internal IAM keys accounts by access key id, and a bucket policy's Principal
        names an account by that id (bare, or as {"AWS": [...]}), so the access key id *is* the
        account name: `name` goes into a policy as is. A second call returns the stored keys. Role
        "user" may create no buckets and reaches root's buckets only through their bucket policy.
        """
        if not _ACCOUNT_NAME.fullmatch(name) or name == self.access_key:
            raise ValueError(f"{name!r}: not a usable account name (letters, digits, . _ -; not root's)")
        existing = self.accounts().get(name)
        if existing is None:
            secret = secrets.token_hex(16)
            account = ET.Element("Account")
            for tag, text in (("Access", name), ("Secret", secret), ("Role", "user")):
                ET.SubElement(account, tag).text = text
            try:
                self._admin("create-user", ET.tostring(account))
                return name, secret
            except AdminError as exc:
                if exc.code != "XAdminUserExists":
                    raise
                existing = self.accounts()[name]
        secret, role = existing
        if role != "user":
            raise AdminError("XAdminUserExists", f"account {name} exists with role {role!r}, not 'user'")
        return name, secret

    def merge_policy(self, bucket: str, tag: str, statements: list[dict[str, Any]]) -> None:
        """Replace the statements whose Sid starts with `tag` in `bucket`'s policy (every cluster sharing this
        server adds its runs' statements to the one policy)."""
        kept = [st for st in self._statements.get(bucket, []) if not st["Sid"].startswith(tag)]
        self._statements[bucket] = [*kept, *statements]
        self.put_policy(bucket, {"Version": "2012-10-17", "Statement": self._statements[bucket]})

    def put_policy(self, bucket: str, policy: dict[str, Any]) -> None:
        """Set `bucket`'s policy as root; every principal it names must be an existing account.

        Root's buckets are private, and once a bucket has a policy versitygw decides a non-root
        account's requests by that policy alone (its ACL is no longer consulted): what no statement
        allows, or any statement denies, is AccessDenied. Root (and admin accounts) bypass it.
        """
        self.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))

    def env_for(self, access: str, secret: str) -> dict[str, str]:
        """The AWS variables for a party that holds only its own account's keys."""
        return {**self.env(), "AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret}

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
