"""TorchServe's token keys: read from the key file it writes, renewed before they expire.

With token authorization on, TorchServe 0.12 writes key_file.json (mode 0600) into the folder it was started
in, with an inference key (REST and gRPC inference, /ping included), a management key (REST and gRPC
management) and an API key that renews the other two. Other local users cannot read the file, so they cannot
scale workers, register or unregister models, or bypass the page's gate to reach the inference API.
Keys expire after token_expiration_min and TorchServe never renews them by itself: `./skin up` does
(TorchServeClient.renew_keys), and every reader re-reads the file when it changes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

KEY_FILE = "key_file.json"


class TokenFile:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._keys: dict = {}
        self._stamp: tuple | None = None

    def keys(self) -> dict:
        """{'inference': ..., 'management': ..., 'API': ...}; {} while the file does not exist yet."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            try:
                self._keys = {k: v["key"] for k, v in json.loads(self.path.read_text()).items()}
                self._stamp = stamp
            except (ValueError, KeyError, TypeError, AttributeError, OSError):
                pass  # caught mid-write: keep the previous keys, read again next time
        return self._keys

    def reload(self) -> None:
        self._stamp = None

    def header(self, kind: str) -> dict[str, str]:
        key = self.keys().get(kind)
        return {"Authorization": f"Bearer {key}"} if key else {}
