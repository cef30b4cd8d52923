"""Checkpoint manifests signed with a per-user key: no pickle is loaded from a folder this user's runs
did not write.

A checkpoint folder is pickles (DeepSpeed's `.pt` files), and unpickling runs code. Anyone who can write
into a checkpoint folder could plant a `step_*` folder or replace a file and recompute its digest. So
the trainer signs each manifest (which holds every file's size and cryptographic digest) with HMAC-SHA256
under a secret only this user can read, and resume, universal conversion and `coatnet-export` check the
signature before anything is unpickled. A folder that is unsigned, or signed with another key, is
refused unless the user vouches for it (`checkpoint.trust_unsigned=true`, `coatnet-export
--trust-unsigned`; logged as a warning).

The key: 32 random bytes in `$COATNET_KEY_FILE`, by default `~/.config/coatnet/checkpoint.key`, created
mode 0600 (in a 0700 folder) on first use, never inside a run folder. Only rank 0 signs and verifies, so
only the first node needs it; where home folders are per node, point COATNET_KEY_FILE at a private file
on the shared filesystem so that a requeued job on another node signs with the same key.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

KEY_ENV = "COATNET_KEY_FILE"
SIGNATURE_KEY = "signature"  # the manifest field: "hmac-sha256:<hex>" over the manifest without it


class Untrusted(ValueError):
    """A checkpoint whose manifest this user's key did not sign."""


def key_path() -> Path:
    return Path(os.environ.get(KEY_ENV) or Path.home() / ".config" / "coatnet" / "checkpoint.key")


def _key(create: bool) -> bytes | None:
    path = key_path()
    if not path.exists():
        if not create:
            return None
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            return path.read_bytes()
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise PermissionError(
            f"{path}: the checkpoint key is readable by others (mode {mode:o}); chmod 600 it"
        )
    return path.read_bytes()


def _mac(key: bytes, payload: str) -> str:
    return "hmac-sha256:" + hmac.new(key, payload.encode(), hashlib.sha256).hexdigest()


def _payload(manifest: dict) -> str:
    import json

    return json.dumps({k: v for k, v in manifest.items() if k != SIGNATURE_KEY}, sort_keys=True)


def sign(manifest: dict) -> dict:
    """`manifest` with its signature field set (the key is created on first use)."""
    return {**manifest, SIGNATURE_KEY: _mac(_key(create=True), _payload(manifest))}


def check(manifest: dict, where: str, *, trust_unsigned: bool, opt_in: str) -> bool:
    """True when this user's key signed `manifest`; with `trust_unsigned`, False instead of raising.

    Raises Untrusted naming `where` and the opt-in (`opt_in`) otherwise.
    """
    signature = manifest.get(SIGNATURE_KEY)
    key = _key(create=False)
    ok = bool(signature and key and hmac.compare_digest(signature, _mac(key, _payload(manifest))))
    if ok or trust_unsigned:
        return ok
    why = "is not signed" if not signature else "is signed with another key than yours"
    raise Untrusted(
        f"{where}: its manifest {why} ({key_path()}); loading it would unpickle files this user's runs did "
        f"not write. If you trust whoever wrote it, pass {opt_in}"
    )
