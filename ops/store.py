"""Versioned model archives in S3-compatible storage (AWS S3, MinIO, moto, ...), with sha256 checksums.

Layout: s3://BUCKET/PREFIX/<name>/<version>/{<name>.mar, meta.json, checksums.json}, plus, when published with
--kserve, kserve/{config/config.properties, model-store/<name>.mar} (KServe's TorchServe runtime: ops/kserve.py).
checksums.json is written last, so a version without it is an unfinished upload and is never swapped to.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from skinmodel.release import ReleaseMeta


class StoreError(RuntimeError):
    pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ArchiveStore:
    bucket: str
    prefix: str = "models"
    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def from_env(cls) -> "ArchiveStore":
        bucket = os.environ.get("SKIN_S3_BUCKET")
        if not bucket:
            raise StoreError("SKIN_S3_BUCKET is not set (and SKIN_S3_ENDPOINT for MinIO or another S3-compatible "
                             "server; credentials come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)")
        return cls(bucket, os.environ.get("SKIN_S3_PREFIX", "models"),
                   os.environ.get("SKIN_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None,
                   os.environ.get("AWS_DEFAULT_REGION", "us-east-1"))

    @property
    def client(self):
        if not hasattr(self, "_client"):
            import boto3
            from botocore.config import Config

            self._client = boto3.client("s3", endpoint_url=self.endpoint_url, region_name=self.region,
                                        config=Config(retries={"max_attempts": 3, "mode": "standard"},
                                                      connect_timeout=5, read_timeout=60))
        return self._client

    def key(self, name: str, version: str, file: str) -> str:
        return f"{self.prefix}/{name}/{version}/{file}"

    def exists(self, name: str, version: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.client.head_object(Bucket=self.bucket, Key=self.key(name, version, "checksums.json"))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise

    def versions(self, name: str) -> list[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        found = set()
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/{name}/"):
            for obj in page.get("Contents", []):
                parts = obj["Key"].split("/")
                if parts[-1] == "checksums.json":
                    found.add(parts[-2])
        return sorted(found)

    def publish(self, mar: Path, meta: ReleaseMeta, kserve_release: Path | None = None) -> dict:
        """Upload an archive and the meta.json it carries (name and version from it); never overwrites. With
        kserve_release, also KServe's layout under <version>/kserve/ (ops/kserve.py), built from that release."""
        name, version = meta.name, meta.version
        if self.exists(name, version):
            raise StoreError(f"{name} {version} is already published in s3://{self.bucket}/{self.prefix}: versions "
                             "are immutable, publish a new version instead")
        with tempfile.TemporaryDirectory() as tmp:
            meta_path = meta.save(Path(tmp))
            files = {f"{name}.mar": mar, "meta.json": meta_path}
            if kserve_release is not None:
                files.update(self._kserve_files(Path(kserve_release), meta, Path(tmp)))
            sums = {"name": name, "version": version, "files": {k: sha256_file(p) for k, p in files.items()}}
            for key, path in files.items():
                self.client.upload_file(str(path), self.bucket, self.key(name, version, key))
        self.client.put_object(Bucket=self.bucket, Key=self.key(name, version, "checksums.json"),
                               Body=json.dumps(sums, indent=2).encode(), ContentType="application/json")
        return sums

    def storage_uri(self, name: str, version: str) -> str:
        """The InferenceService's storageUri for a version published with its KServe layout."""
        return f"s3://{self.bucket}/{self.key(name, version, 'kserve')}"

    @staticmethod
    def _kserve_files(release: Path, meta: ReleaseMeta, tmp: Path) -> dict[str, Path]:
        from ops.kserve import MODEL_CONFIG, kserve_config
        from stack.archive import build_mar

        if ReleaseMeta.load(release).weights_sha256 != meta.weights_sha256:
            raise StoreError(f"--kserve {release} holds other weights than the archive being published")
        _, mar = build_mar(release, tmp / "kserve", meta.name, meta.version, model_config=MODEL_CONFIG)
        config = tmp / "config.properties"
        config.write_text(kserve_config(meta.name, meta.version, mar.name))
        return {f"kserve/model-store/{mar.name}": mar, "kserve/config/config.properties": config}

    def fetch(self, name: str, version: str, dest: Path) -> Path:
        """Download the archive to dest (atomically) and verify it against checksums.json."""
        from botocore.exceptions import ClientError

        try:
            sums = json.loads(self.client.get_object(Bucket=self.bucket,
                                                     Key=self.key(name, version, "checksums.json"))["Body"].read())
        except ClientError:
            raise StoreError(f"{name} {version} is not published in s3://{self.bucket}/{self.prefix} "
                             f"(published: {', '.join(self.versions(name)) or 'none'})") from None
        tmp = dest.with_name(dest.name + ".part")
        self.client.download_file(self.bucket, self.key(name, version, f"{name}.mar"), str(tmp))
        got, want = sha256_file(tmp), sums["files"][f"{name}.mar"]
        if got != want:
            tmp.unlink()
            raise StoreError(f"checksum mismatch for {name} {version}: downloaded {got[:16]}..., published "
                             f"{want[:16]}...; the archive is corrupt or was tampered with, refusing it")
        os.replace(tmp, dest)
        return dest
