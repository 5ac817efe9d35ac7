"""python -m ops publish|swap|rollback|status|versions: model versions in S3 and on a running TorchServe.

Settings from the environment: SKIN_S3_BUCKET, SKIN_S3_ENDPOINT (MinIO / S3-compatible; unset for AWS),
SKIN_S3_PREFIX (default "models"), AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION,
SKIN_MANAGEMENT_URL (default http://127.0.0.1:8081), SKIN_INFERENCE_URL (default http://127.0.0.1:8080),
SKIN_KEY_FILE (TorchServe's key_file.json; default .stack/torchserve/key_file.json, the one ./skin up's
TorchServe writes), SKIN_MODEL_STORE (default model_store/).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _admin():
    from ops.swap import TorchServeAdmin
    from stack.tokens import KEY_FILE, TokenFile

    key_file = Path(os.environ.get("SKIN_KEY_FILE", REPO / ".stack" / "torchserve" / KEY_FILE))
    return TorchServeAdmin(os.environ.get("SKIN_MANAGEMENT_URL", "http://127.0.0.1:8081"),
                           os.environ.get("SKIN_INFERENCE_URL", "http://127.0.0.1:8080"),
                           TokenFile(key_file) if key_file.exists() else None)


def _canary_images(args) -> list[bytes]:
    if args.canary:
        return [Path(p).read_bytes() for p in args.canary]
    from training.data import default_data_dir

    root = default_data_dir()
    found = sorted((root / "images").glob("*.jpg"))[:3] if root else []
    if not found:
        raise SystemExit("error: no canary images: pass --canary IMG [IMG ...] (real lesion photos)")
    return [p.read_bytes() for p in found]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ops", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    pub = sub.add_parser("publish", help="upload a .mar + meta.json as an immutable version")
    pub.add_argument("--mar", required=True)
    pub.add_argument("--meta", required=True, help="the meta.json inside that archive (name and version)")
    sw = sub.add_parser("swap", help="make VERSION the served default without downtime")
    sw.add_argument("--to", required=True, metavar="VERSION")
    rb = sub.add_parser("rollback", help="swap back to the version served before the last swap")
    for s in (sw, rb):
        s.add_argument("--name", default="skin-lesion")
        s.add_argument("--workers", type=int, default=2)
        s.add_argument("--drain-seconds", type=float, default=3.0)
        s.add_argument("--canary", nargs="*", help="images for the canary predictions (default: 3 HAM10000 images)")
    st = sub.add_parser("status", help="registered versions, the default, workers")
    st.add_argument("--name", default="skin-lesion")
    vs = sub.add_parser("versions", help="versions published in the bucket")
    vs.add_argument("--name", default="skin-lesion")
    args = p.parse_args(argv)

    from ops.store import ArchiveStore, StoreError
    from ops.swap import SwapError, previous_version, swap

    model_store = Path(os.environ.get("SKIN_MODEL_STORE", REPO / "model_store"))
    try:
        if args.command == "publish":
            sums = ArchiveStore.from_env().publish(Path(args.mar), Path(args.meta))
            print(f"published {sums['name']} {sums['version']}: " + json.dumps(sums["files"]))
        elif args.command == "versions":
            print("\n".join(ArchiveStore.from_env().versions(args.name)) or "(none)")
        elif args.command == "status":
            admin = _admin()
            default = admin.default_version(args.name)
            for v in admin.versions(args.name):
                workers = ", ".join(f"{w['id']}:{w['status']}" for w in v.get("workers", []))
                mark = " (default)" if v["modelVersion"] == default else ""
                print(f"{v['modelName']} {v['modelVersion']}{mark}: {workers}")
        else:
            target = args.to if args.command == "swap" else previous_version(model_store, args.name)
            swap(_admin(), ArchiveStore.from_env(), model_store, args.name, target, _canary_images(args),
                 args.workers, args.drain_seconds)
    except (StoreError, SwapError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - network/credential problems: say what, not a trace
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
