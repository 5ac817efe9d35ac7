"""python -m ops publish|swap|rollback|status|versions: model versions in S3 and on a running TorchServe.

Settings from the environment: SKIN_S3_BUCKET, SKIN_S3_ENDPOINT (MinIO / S3-compatible; unset for AWS),
SKIN_S3_PREFIX (default "models"), AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION; the
stack's own (stack/settings.py): SKIN_MANAGEMENT_PORT, SKIN_INFERENCE_PORT, SKIN_STATE_DIR (TorchServe's key
file is read from its torchserve/ folder), SKIN_MODEL_STORE.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _client():
    from stack.settings import current
    from stack.tokens import TokenFile
    from stack.torchserve_api import TorchServeClient

    s = current()
    return TorchServeClient(s.management_url, s.inference_url, TokenFile(s.key_file) if s.key_file.exists() else None)


def _canary_images(args) -> list[bytes]:
    if args.canary:
        return [Path(p).read_bytes() for p in args.canary]
    from stack.settings import sample_images

    found = sample_images(3)
    if not found:
        raise SystemExit("error: no canary images: pass --canary IMG [IMG ...] (real lesion photos)")
    return found


def main(argv=None) -> int:
    from stack.settings import MODEL_NAME

    p = argparse.ArgumentParser(prog="python -m ops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish", help="upload a .mar + meta.json as an immutable version")
    pub.add_argument("--mar", required=True)
    pub.add_argument("--meta", required=True, help="the archive's meta.json (its name and version are used)")
    pub.add_argument("--kserve", metavar="RELEASE_DIR", help="also publish KServe's TorchServe-runtime layout "
                                                            "(config/ + model-store/), built from this release")
    sw = sub.add_parser("swap", help="make VERSION the served default without downtime")
    sw.add_argument("--to", required=True, metavar="VERSION")
    rb = sub.add_parser("rollback", help="swap back to the version served before the last swap")
    for s in (sw, rb):
        s.add_argument("--name", default=MODEL_NAME)
        s.add_argument("--workers", type=int, default=2)
        s.add_argument("--drain-seconds", type=float, default=3.0)
        s.add_argument("--canary", nargs="*", help="images for the canary predictions (default: 3 HAM10000 images)")
    st = sub.add_parser("status", help="registered versions, the default, workers")
    st.add_argument("--name", default=MODEL_NAME)
    vs = sub.add_parser("versions", help="versions published in the bucket")
    vs.add_argument("--name", default=MODEL_NAME)
    args = p.parse_args(argv)

    from ops.store import ArchiveStore, StoreError
    from ops.swap import SwapError, previous_version, swap
    from skinmodel.release import ReleaseError, ReleaseMeta
    from stack.settings import current
    from stack.torchserve_api import ManagementError

    model_store = current().model_store
    try:
        if args.command == "publish":
            store = ArchiveStore.from_env()
            sums = store.publish(Path(args.mar), ReleaseMeta.load(args.meta), args.kserve and Path(args.kserve))
            print(f"published {sums['name']} {sums['version']}: " + json.dumps(sums["files"]))
            if args.kserve:
                print(f"KServe storageUri: {store.storage_uri(sums['name'], sums['version'])}")
        elif args.command == "versions":
            print("\n".join(ArchiveStore.from_env().versions(args.name)) or "(none)")
        elif args.command == "status":
            admin = _client()
            default = admin.default_version(args.name)
            for v in admin.versions(args.name):
                workers = ", ".join(f"{w['id']}:{w['status']}" for w in v.get("workers", []))
                mark = " (default)" if v["modelVersion"] == default else ""
                print(f"{v['modelName']} {v['modelVersion']}{mark}: {workers}")
        else:
            target = args.to if args.command == "swap" else previous_version(model_store, args.name)
            swap(_client(), ArchiveStore.from_env(), model_store, args.name, target, _canary_images(args),
                 args.workers, args.drain_seconds)
    except (StoreError, SwapError, ManagementError, ReleaseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - network/credential problems: say what, not a trace
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
