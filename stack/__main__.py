"""./skin COMMAND: the local stack (up, down, serve, ready), the archive, the audit log and the tests.

`./skin up` builds model_store/<name>.mar when it is missing or older than its inputs, starts TorchServe,
the logger sidecar and the page's gate, waits for READY workers, prints the URLs and stays in the
foreground, restarting whatever dies; Ctrl-C (or `./skin down` from another shell) stops everything it
started, workers included.

Settings (flags override them): SKIN_RELEASE_DIR, SKIN_MODEL_STORE, SKIN_STATE_DIR, SKIN_SITE_HOST,
SKIN_SITE_PORT, SKIN_INFERENCE_HOST, SKIN_INFERENCE_PORT, SKIN_MANAGEMENT_PORT, SKIN_METRICS_PORT,
SKIN_ENABLE_MODEL_API, SKIN_TOKEN_AUTH, DATABASE_URL (else the embedded SQLite file in SKIN_DATA_DIR),
SKIN_SPOOL_DIR, SKIN_REVIEW_KEEP_DAYS (opt-in: keep uncertain/refused uploads that many days in
.stack/review for ./skin logs review; 0, the default, keeps none), HAM10000_DIR. Defaults: stack/settings.py.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from skinmodel.release import ReleaseError
from stack.archive import ArchiveError, build_mar, ensure_archive
from stack.page import render_page
from stack.settings import MODEL_NAME, REPO, Settings, torchserve_config, url
from stack.supervisor import Child, Supervisor, process_child
from stack.torchserve import ServeError, TorchServe
from stack.torchserve_api import ManagementError

S = Settings.from_env()


def audit_env() -> dict:
    """Where the handler spools audit events and where the embedded database lives."""
    # SKIN_REVIEW_DIR always: `logs review` shows files kept earlier; the sidecar prunes only when retention is on.
    return {**os.environ, "SKIN_SPOOL_DIR": str(S.spool), "SKIN_DATA_DIR": str(S.data),
            "SKIN_REVIEW_DIR": str(S.review_dir), **review_env()}


def review_env() -> dict[str, str]:
    """The opt-in review folder, for the handler (writes), the sidecar (prunes) and `logs review` (shows)."""
    if S.review_keep_days <= 0:
        return {}
    return {"SKIN_REVIEW_DIR": str(S.review_dir), "SKIN_REVIEW_KEEP_DAYS": str(S.review_keep_days)}


def torchserve(args, name: str, mar: Path, env: dict | None = None) -> TorchServe:
    return TorchServe(Path(args.model_store), {name: mar.name}, S.torchserve_dir,
                      inference_port=int(args.inference_port), management_port=int(args.management_port),
                      metrics_port=int(args.metrics_port), inference_host=args.inference_host,
                      enable_model_api=args.enable_model_api, env=env, token_auth=args.token_auth)


def _private_state() -> None:
    """Everything the stack writes (audit database, spool, logs, TorchServe's key file) is the owner's alone."""
    os.umask(0o077)
    S.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for root, _dirs, files in os.walk(S.state_dir):  # tighten what an older version left readable
        os.chmod(root, 0o700)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode & 0o700)


def _apply_review_retention() -> None:
    """At every start: with retention off (the default) no kept upload survives; with it on, expired ones go."""
    from skinmodel.review_store import ReviewStore

    store = ReviewStore(S.review_dir, S.review_keep_days)
    removed = store.prune() if store.enabled else store.purge()
    if removed:
        print(f"review folder: removed {removed} kept upload(s) "
              + ("past their retention" if store.enabled else "(SKIN_REVIEW_KEEP_DAYS is 0: retention is off)"))


def _wait_port(host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.1)
    return False


def _interrupt(*_args):
    raise KeyboardInterrupt


def _alive(pid: int) -> bool:
    """Running and not a zombie (an exited child its parent has not reaped yet counts as stopped)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cmd_up(args) -> int:
    _private_state()
    _apply_review_retention()
    pid_file = S.state_dir / "stack.pid"
    if pid_file.exists() and _alive(int(pid_file.read_text())):
        print(f"the stack is already running (pid {pid_file.read_text().strip()}); ./skin down stops it")
        return 1
    try:
        name, mar = ensure_archive(Path(args.release), Path(args.model_store), args.rebuild)
    except (ArchiveError, ReleaseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    side_env = audit_env()
    ts = torchserve(args, name, mar, env={"SKIN_SPOOL_DIR": side_env["SKIN_SPOOL_DIR"], **review_env()})
    site_host = "127.0.0.1" if args.site_host == "0.0.0.0" else args.site_host
    gate_argv = [sys.executable, "-m", "stack.gate", "--dist", str(render_page(Path(args.release), S.state_dir / "site", review_keep_days=S.review_keep_days)),
                 "--upstream", ts.inference_url, "--host", args.site_host, "--port", str(args.site_port)]
    if ts.tokens:
        gate_argv += ["--key-file", str(ts.tokens.path)]
    sup = Supervisor()
    sup.add(process_child("the logger sidecar", [sys.executable, "-m", "logger", "run"], cwd=REPO, env=side_env))
    served = sup.add(Child("TorchServe", ts.start, lambda: ts.proc is not None and ts.proc.poll() is None,
                           ts.stop, ts.exit_reason))
    sup.add(process_child("the page's gate", gate_argv, cwd=REPO))

    # Both explicitly: a parent shell that ran us in the background may have left SIGINT ignored.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    pid_file.write_text(str(os.getpid()))
    try:
        for child in sup.children:
            child.launch()
        print(f"starting TorchServe (logs: {ts.workdir / 'logs'}) ...", flush=True)
        took = ts.wait_ready()
        if not _wait_port(site_host, int(args.site_port), 30):
            raise ServeError(f"the page's gate did not start listening on port {args.site_port}")
        page = url(int(args.site_port), args.site_host)
        database = "DATABASE_URL" if S.database_url else f"embedded SQLite in {S.data}"
        print(f"ready in {took:.1f} s: {len(ts.workers(name))} worker(s) READY for {name}\n"
              f"  page        : open {page}/\n"
              f"  predictions : curl -T lesion.jpg {page}/predictions/{name}\n"
              f"  explanations: curl -T lesion.jpg {page}/explanations/{name}\n"
              f"  audit log   : {database} (./skin logs show)\n"
              "internal, TorchServe's own ports (loopback only, not for users):\n"
              f"  management  : {ts.management_url}"
              f"{' (key in ' + str(ts.tokens.path) + ')' if ts.tokens else ''}\n"
              f"  metrics     : {ts.metrics_url}/metrics\n"
              "Ctrl-C or ./skin down stops the stack.", flush=True)
        renew_every = 60 * float(torchserve_config("token_expiration_min") or 60) / 3
        renewed = time.monotonic()
        while True:
            sup.tick()
            if ts.tokens and served.alive() and time.monotonic() - max(renewed, served.started_at) > renew_every:
                try:
                    ts.api.renew_keys()
                    renewed = time.monotonic()
                except (ManagementError, OSError) as exc:
                    print(f"renewing TorchServe's keys failed ({exc}); trying again in 30 s", file=sys.stderr)
                    renewed += 30
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    except (ServeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C (or SIGTERM) during the clean-up must not cut it short and leave orphans behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        sup.stop_all()  # the gate, then TorchServe, then the logger: the last predictions' events are drained
        pid_file.unlink(missing_ok=True)
        print("stopped: TorchServe and its workers have exited", flush=True)


def cmd_down(_args) -> int:
    pid_file = S.state_dir / "stack.pid"
    if not pid_file.exists() or not _alive(pid := int(pid_file.read_text())):
        print("the stack is not running")
        pid_file.unlink(missing_ok=True)
        return 0
    os.kill(pid, signal.SIGTERM)
    for _ in range(600):
        if not _alive(pid):
            print("stopped")
            return 0
        time.sleep(0.1)
    print(f"pid {pid} did not stop within 60 s", file=sys.stderr)
    return 1


def cmd_archive(args) -> int:
    try:
        meta, mar = build_mar(Path(args.release), Path(args.out), args.name, args.version, args.file_name)
    except (ArchiveError, ReleaseError) as exc:
        print(f"archive: {exc}", file=sys.stderr)
        return 1
    print(f"built {mar} ({meta.name} {meta.version}, {mar.stat().st_size / 2**20:.0f} MB)")
    if args.publish:
        from ops.store import ArchiveStore, StoreError

        try:
            sums = ArchiveStore.from_env().publish(mar, meta)
        except StoreError as exc:
            print(f"publish: {exc}", file=sys.stderr)
            return 1
        print(f"published {sums['name']} {sums['version']}")
    return 0


COMPOSE_TESTS = ["tests/test_compose.py", "tests/test_compose_up.py"]


def cmd_test(args) -> int:
    """pytest; --fast runs the fast tier only (no Java, PostgreSQL, browser or HAM10000); --compose the compose
    tier only (docker-compose.yml brought up in Docker: tests/test_compose_up.py)."""
    pytest_args = (["-m", "fast"] if "--fast" in args.pytest_args else []) + \
        (COMPOSE_TESTS if "--compose" in args.pytest_args else []) + \
        [a for a in args.pytest_args if a not in ("--fast", "--compose")]
    # Workers of the TorchServes the tests start use one thread each; so does the test process itself.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call([sys.executable, "-m", "pytest", *pytest_args], cwd=REPO, env=env)


def cmd_images(args) -> int:
    """Local stand-ins for the public base images, for docker compose where they cannot be pulled."""
    if not args.offline:
        print("images: the public base images come with `docker compose build`; --offline builds local ones "
              "from Debian's packages and this host's pip (README, Docker Compose)", file=sys.stderr)
        return 2
    return subprocess.call(["bash", str(REPO / "docker" / "offline-images.sh")] + (["--rebuild"] if args.rebuild else []),
                           cwd=REPO)


def cmd_logs(args) -> int:
    return subprocess.call([sys.executable, "-m", "logger", *args.logger_args], cwd=REPO, env=audit_env())


def cmd_serve(args) -> int:
    """TorchServe alone in the foreground (the container's command): no page, no sidecar."""
    try:
        name, mar = ensure_archive(Path(args.release), Path(args.model_store))
    except (ArchiveError, ReleaseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ts = torchserve(args, name, mar)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    try:
        ts.start()
        ts.wait_ready()
        print(f"{name} READY on {ts.overrides['inference_address']}", flush=True)
        return ts.proc.wait()
    except KeyboardInterrupt:
        return 0
    finally:
        ts.stop()


def cmd_ready(args) -> int:
    """Exit 0 when the model has a READY worker (a health check that /ping cannot give)."""
    ts = TorchServe(Path("."), {}, S.torchserve_dir, management_port=int(args.management_port),
                    token_auth=args.token_auth)
    ready = ts.api.ready_workers(args.name) > 0
    print("READY" if ready else "NOT READY")
    return 0 if ready else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="./skin", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build the archive if needed, start the whole local stack, stay in the foreground",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    up.add_argument("--release", default=str(S.release_dir), help="weights + meta.json folder (SKIN_RELEASE_DIR)")
    up.add_argument("--model-store", default=str(S.model_store), help="where the .mar goes (SKIN_MODEL_STORE)")
    up.add_argument("--inference-host", default=S.inference_host, help="SKIN_INFERENCE_HOST")
    up.add_argument("--inference-port", default=S.inference_port, help="SKIN_INFERENCE_PORT")
    up.add_argument("--management-port", default=S.management_port, help="SKIN_MANAGEMENT_PORT")
    up.add_argument("--metrics-port", default=S.metrics_port, help="SKIN_METRICS_PORT")
    up.add_argument("--site-host", default=S.site_host, help="address of the page and its gate (SKIN_SITE_HOST)")
    up.add_argument("--site-port", default=S.site_port, help="SKIN_SITE_PORT")
    up.add_argument("--enable-model-api", action="store_true", default=S.enable_model_api,
                    help="allow register/unregister, for python -m ops swap (loopback only; SKIN_ENABLE_MODEL_API)")
    up.add_argument("--token-auth", action=argparse.BooleanOptionalAction, default=S.token_auth,
                    help="TorchServe's token authorization (default: on, from config.properties; turn it off only "
                         "where a network namespace isolates TorchServe, e.g. its own container; SKIN_TOKEN_AUTH)")
    up.add_argument("--rebuild", action="store_true", help="rebuild the .mar even if it is up to date")
    up.set_defaults(func=cmd_up)
    serve = sub.add_parser("serve", help="TorchServe only, in the foreground (what the container runs)")
    for action in up._actions[1:]:
        if action.dest not in ("site_host", "site_port", "rebuild"):
            serve._add_action(action)
    serve.set_defaults(func=cmd_serve)
    ready = sub.add_parser("ready", help="exit 0 if the model has a READY worker (container health check)")
    ready.add_argument("--name", default=MODEL_NAME)
    ready.add_argument("--management-port", default=S.management_port)
    ready.add_argument("--token-auth", action=argparse.BooleanOptionalAction, default=S.token_auth)
    ready.set_defaults(func=cmd_ready)
    down = sub.add_parser("down", help="stop a stack started by ./skin up")
    down.set_defaults(func=cmd_down)
    arch = sub.add_parser("archive", help="build <out>/<name>.mar from a release (what archive.sh runs)")
    arch.add_argument("--release", "--weights-dir", default=str(S.release_dir), help="folder with meta.json + weights")
    arch.add_argument("--out", "--model-store", default=str(S.model_store), help="where the .mar goes")
    arch.add_argument("--version", help="archive version (default: meta.json's)")
    arch.add_argument("--name", help="model name (default: meta.json's)")
    arch.add_argument("--file-name", help="archive file name (default: <name>.mar)")
    arch.add_argument("--publish", action="store_true", help="also upload it as an immutable version to S3 "
                                                             "(python -m ops publish; needs SKIN_S3_BUCKET)")
    arch.set_defaults(func=cmd_archive)
    predict = sub.add_parser("predict", help="score image files and folders into a CSV (through the running "
                                             "service, or --local); ./skin predict --help", add_help=False)
    predict.add_argument("predict_args", nargs=argparse.REMAINDER)
    logs = sub.add_parser("logs", help="the prediction audit log: ./skin logs show|stats|status|review|prune; "
                                       "./skin logs --help", add_help=False)  # --help: the logger's, with its commands
    logs.add_argument("logger_args", nargs=argparse.REMAINDER)
    logs.set_defaults(func=cmd_logs)
    images = sub.add_parser("images", help="--offline: build local base images for docker compose from Debian's "
                                           "packages and local wheels (cached)", description=cmd_images.__doc__)
    images.add_argument("--offline", action="store_true", help="build skin-local/* images (debootstrap, Debian's "
                        "Python 3.11, PostgreSQL 15, nginx; moto's S3 server) and write .stack/compose-offline.env")
    images.add_argument("--rebuild", action="store_true", help="rebuild them even if they exist")
    images.set_defaults(func=cmd_images)
    test = sub.add_parser("test", help="run the test suite (pytest); --fast: the fast tier; --compose: the compose "
                                       "tier; other arguments go to pytest",
                          description="Run the test suite against real services (TorchServe, PostgreSQL, headless "
                                      "Chromium, nginx, an S3 server, HAM10000, and docker compose). --fast: only the "
                                      "fast tier (synthetic data, SQLite; no Java, PostgreSQL, browser, Docker or "
                                      "HAM10000; under a minute). --compose: only the compose tier. Any other argument "
                                      "goes to pytest, e.g. ./skin test tests/test_gate.py -k budget.")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER, help="--fast or --compose, and pytest's own arguments")
    test.set_defaults(func=cmd_test)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["test"] and argv[1:2] not in (["-h"], ["--help"]):
        return cmd_test(argparse.Namespace(pytest_args=argv[1:]))  # everything after 'test' belongs to pytest
    if argv[:1] == ["logs"]:  # the logger's own parser (and --help, which lists its commands)
        return cmd_logs(argparse.Namespace(logger_args=argv[1:]))
    if argv[:1] == ["predict"]:  # its own parser (and --help)
        from stack.predict import main as predict_main

        return predict_main(argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
