#!/opt/venv/bin/python
"""The three MinIO client commands docker-compose.yml uses, against moto's S3 server (offline images only):
  mc ready ALIAS                          exit 0 once the server answers (ALIAS 'local': this container)
  mc alias set ALIAS URL USER PASSWORD    remember where ALIAS points
  mc mb [--ignore-existing] ALIAS/BUCKET  create a bucket
"""
import json
import sys
import urllib.request
from pathlib import Path

ALIASES = Path.home() / ".mc-aliases.json"


def aliases() -> dict:
    found = json.loads(ALIASES.read_text()) if ALIASES.exists() else {}
    return {"local": {"url": "http://127.0.0.1:9000", "user": "", "password": ""}, **found}


def main(argv: list[str]) -> int:
    if argv[:1] == ["ready"] and len(argv) == 2:
        try:
            urllib.request.urlopen(aliases()[argv[1]]["url"] + "/moto-api/", timeout=3).close()
            return 0
        except (OSError, KeyError) as exc:
            print(f"mc ready: {exc}", file=sys.stderr)
            return 1
    if argv[:2] == ["alias", "set"] and len(argv) == 6:
        ALIASES.write_text(json.dumps({**aliases(), argv[2]: dict(zip(("url", "user", "password"), argv[3:]))}))
        return 0
    if argv[:1] == ["mb"]:
        import boto3

        ignore = "--ignore-existing" in argv
        alias, _, bucket = [a for a in argv[1:] if not a.startswith("--")][0].partition("/")
        where = aliases()[alias]
        s3 = boto3.client("s3", endpoint_url=where["url"], aws_access_key_id=where["user"] or "x",
                          aws_secret_access_key=where["password"] or "x", region_name="us-east-1")
        existing = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        if bucket in existing:
            print(f"bucket {bucket} exists")
            return 0 if ignore else 1
        s3.create_bucket(Bucket=bucket)
        print(f"bucket created: {alias}/{bucket}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
