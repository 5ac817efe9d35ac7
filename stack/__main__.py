"""./skin COMMAND: the local stack (up, down, status), the archive and the tests.

`./skin up` builds model_store/<name>.mar when it is missing or older than its inputs, starts TorchServe,
waits for READY workers, prints the URLs and stays in the foreground; Ctrl-C (or `./skin down` from another
shell) stops everything it started, workers included.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from stack.supervisor import Child, Supervisor, process_child
from stack.tokens import renew
from stack.torchserve import REPO, ServeError, TorchServe, config_value, mar_version

STATE = Path(os.environ.get("SKIN_STATE_DIR", REPO / ".stack"))


def env(name: str, default: str) -> str:
    """Settings come from SKIN_* environment variables, with flags overriding them."""
    return os.environ.get(f"SKIN_{name}", default)


def ensure_archive(release: Path, store: Path, force: bool = False) -> tuple[str, Path]:
    meta_path = release / "meta.json"
    if not meta_path.exists():
        raise ServeError(f"{meta_path} is missing: the committed release model should be there "
                         "(or train one: python -m training all --quick --release-dir release)")
    meta = json.loads(meta_path.read_text())
    mar = store / f"{meta['name']}.mar"
    # Every file of handler/ counts (archive.sh decides which of them go in): a changed one rebuilds the .mar.
    handler = [p for p in (REPO / "handler").iterdir() if p.suffix in (".py", ".yaml")]
    inputs = [meta_path, release / meta.get("weights_file", "model.pt"), *handler]
    stale = (not mar.exists() or force or mar.stat().st_mtime < max(p.stat().st_mtime for p in inputs)
             or mar_version(mar) != meta["version"])
    if stale:
        print(f"building {mar} ...", flush=True)
        subprocess.run([str(REPO / "archive.sh"), "--weights-dir", str(release), "--out", str(store)], check=True,
                       env={**os.environ, "PYTHON": sys.executable})
    return meta["name"], mar


def audit_env() -> dict:
    """Where the handler spools audit events and where the embedded database lives, unless set already."""
    return {**os.environ, "SKIN_SPOOL_DIR": os.environ.get("SKIN_SPOOL_DIR", str(STATE / "spool")),
            "SKIN_DATA_DIR": os.environ.get("SKIN_DATA_DIR", str(STATE / "data"))}


def build_site(release: Path) -> Path:
    """Render the page from the release's meta.json into the state folder (the API is same-origin)."""
    out = STATE / "site"
    subprocess.run([sys.executable, str(REPO / "site" / "build.py"), "--meta", str(release / "meta.json"),
                    "--api-base", "", "--out", str(out)], check=True, capture_output=True)
    return out


def _private_state() -> None:
    """Everything the stack writes (audit database, spool, logs, TorchServe's key file) is the owner's alone."""
    os.umask(0o077)
    STATE.mkdir(mode=0o700, exist_ok=True)
    for root, dirs, files in os.walk(STATE):  # tighten what an older version left readable
        os.chmod(root, 0o700)
        for f in files:
            path = os.path.join(root, f)
            if not os.path.islink(path):
                os.chmod(path, os.stat(path).st_mode & 0o700)


def _wait_port(host: str, port: int, timeout: float) -> bool:
    import socket

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


def cmd_up(args) -> int:
    _private_state()
    pid_file = STATE / "stack.pid"
    if pid_file.exists() and _alive(int(pid_file.read_text())):
        print(f"the stack is already running (pid {pid_file.read_text().strip()}); ./skin down stops it")
        return 1
    name, mar = ensure_archive(Path(args.release), Path(args.model_store), args.rebuild)
    side_env = audit_env()
    ts = TorchServe(Path(args.model_store), {name: mar.name}, STATE / "torchserve",
                    inference_port=int(args.inference_port), management_port=int(args.management_port),
                    metrics_port=int(args.metrics_port), inference_host=args.inference_host,
                    enable_model_api=args.enable_model_api, env={"SKIN_SPOOL_DIR": side_env["SKIN_SPOOL_DIR"]},
                    token_auth=args.token_auth)
    site_host = "127.0.0.1" if args.site_host == "0.0.0.0" else args.site_host
    gate_argv = [sys.executable, "-m", "stack.gate", "--dist", str(build_site(Path(args.release))),
                 "--upstream", ts.inference_url, "--host", args.site_host, "--port", str(args.site_port),
                 "--max-body", config_value("max_request_size")]
    if ts.tokens:
        gate_argv += ["--key-file", str(ts.tokens.path)]
    sup = Supervisor()
    sup.add(process_child("the logger sidecar", [sys.executable, "-m", "logger", "run"], cwd=REPO, env=side_env))
    torchserve = sup.add(Child("TorchServe", ts.start, lambda: ts.proc is not None and ts.proc.poll() is None,
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
        page = f"http://{site_host}:{args.site_port}"
        print(f"ready in {took:.1f} s: {len(ts.workers(name))} worker(s) READY for {name}\n"
              f"  page       : open {page}/\n"
              f"  predictions: curl -T lesion.jpg {page}/predictions/{name}\n"
              f"  management : {ts.management_url} (loopback only"
              f"{', key in ' + str(ts.tokens.path) if ts.tokens else ''})\n"
              f"  metrics    : {ts.metrics_url}/metrics\n"
              f"  audit log  : {'DATABASE_URL' if os.environ.get('DATABASE_URL') else 'embedded SQLite in ' + side_env['SKIN_DATA_DIR']}"
              f" (./skin logs show)\n"
              "Ctrl-C or ./skin down stops the stack.", flush=True)
        renew_every = 60 * float(config_value("token_expiration_min") or 60) / 3
        renewed = time.monotonic()
        while True:
            sup.tick()
            if ts.tokens and torchserve.alive() and time.monotonic() - max(renewed, torchserve.started_at) > renew_every:
                try:
                    renew(ts.management_url, ts.tokens)
                    renewed = time.monotonic()
                except OSError as exc:
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


def _alive(pid: int) -> bool:
    """Running and not a zombie (an exited child its parent has not reaped yet counts as stopped)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cmd_down(_args) -> int:
    pid_file = STATE / "stack.pid"
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
    name, mar = ensure_archive(Path(args.release), Path(args.model_store), force=True)
    print(f"{mar} ({name} {mar_version(mar)})")
    return 0


def cmd_test(args) -> int:
    # Workers of the TorchServes the tests start use one thread each; so does the test process itself.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call([sys.executable, "-m", "pytest", *args.pytest_args], cwd=REPO, env=env)


def cmd_logs(args) -> int:
    return subprocess.call([sys.executable, "-m", "logger", *args.logger_args], cwd=REPO, env=audit_env())


def cmd_serve(args) -> int:
    """TorchServe alone in the foreground (the container's command): no page, no sidecar."""
    name, mar = ensure_archive(Path(args.release), Path(args.model_store))
    ts = TorchServe(Path(args.model_store), {name: mar.name}, STATE / "torchserve",
                    inference_port=int(args.inference_port), management_port=int(args.management_port),
                    metrics_port=int(args.metrics_port), inference_host=args.inference_host,
                    enable_model_api=args.enable_model_api, token_auth=args.token_auth)
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
    ts = TorchServe(Path("."), {}, STATE / "torchserve", management_port=int(args.management_port),
                    token_auth=args.token_auth)
    try:
        ready = any(w.get("status") == "READY" for w in ts.workers(args.name))
    except OSError:
        ready = False
    print("READY" if ready else "NOT READY")
    return 0 if ready else 1


def _token_auth_env() -> bool | None:
    value = os.environ.get("SKIN_TOKEN_AUTH")
    return None if value is None else value.lower() in ("1", "true", "yes", "on")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="./skin", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build the archive if needed, start the whole local stack, stay in the foreground")
    up.add_argument("--release", default=env("RELEASE_DIR", str(REPO / "release")), help="weights + meta.json folder")
    up.add_argument("--model-store", default=env("MODEL_STORE", str(REPO / "model_store")))
    up.add_argument("--inference-host", default=env("INFERENCE_HOST", "127.0.0.1"))
    up.add_argument("--inference-port", default=env("INFERENCE_PORT", "8080"))
    up.add_argument("--management-port", default=env("MANAGEMENT_PORT", "8081"))
    up.add_argument("--metrics-port", default=env("METRICS_PORT", "8082"))
    up.add_argument("--site-host", default=env("SITE_HOST", "127.0.0.1"), help="address of the page (and its proxy)")
    up.add_argument("--site-port", default=env("SITE_PORT", "8000"))
    up.add_argument("--enable-model-api", action="store_true", default=env("ENABLE_MODEL_API", "false") == "true",
                    help="allow register/unregister, for python -m ops swap (loopback only)")
    up.add_argument("--token-auth", action=argparse.BooleanOptionalAction, default=_token_auth_env(),
                    help="TorchServe's token authorization (default: on, from config.properties; turn it off only "
                         "where a network namespace isolates TorchServe, e.g. its own container; env SKIN_TOKEN_AUTH)")
    up.add_argument("--rebuild", action="store_true", help="rebuild the .mar even if it is up to date")
    up.set_defaults(func=cmd_up)
    serve = sub.add_parser("serve", help="TorchServe only, in the foreground (what the container runs)",
                           parents=[], add_help=True)
    for action in up._actions[1:]:
        if action.dest not in ("site_host", "site_port", "rebuild"):
            serve._add_action(action)
    serve.set_defaults(func=cmd_serve)
    ready = sub.add_parser("ready", help="exit 0 if the model has a READY worker (container health check)")
    ready.add_argument("--name", default="skin-lesion")
    ready.add_argument("--management-port", default=env("MANAGEMENT_PORT", "8081"))
    ready.add_argument("--token-auth", action=argparse.BooleanOptionalAction, default=_token_auth_env())
    ready.set_defaults(func=cmd_ready)
    down = sub.add_parser("down", help="stop a stack started by ./skin up")
    down.set_defaults(func=cmd_down)
    arch = sub.add_parser("archive", help="rebuild model_store/<name>.mar from the release model")
    arch.add_argument("--release", default=str(REPO / "release"))
    arch.add_argument("--model-store", default=str(REPO / "model_store"))
    arch.set_defaults(func=cmd_archive)
    logs = sub.add_parser("logs", help="the prediction audit log: ./skin logs show|stats|status")
    logs.add_argument("logger_args", nargs=argparse.REMAINDER)
    logs.set_defaults(func=cmd_logs)
    test = sub.add_parser("test", help="run the test suite (pytest); extra arguments go to pytest")
    test.add_argument("pytest_args", nargs=argparse.REMAINDER)
    test.set_defaults(func=cmd_test)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["test"] and argv[1:2] not in (["-h"], ["--help"]):
        return cmd_test(argparse.Namespace(pytest_args=argv[1:]))  # everything after 'test' belongs to pytest
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
