"""Ray token authentication from the client's side: where this machine's token for a cluster is.

Ray 2.60 clusters use token authentication by default (`ray start --head` turns it on when a token
exists, and every `ray.init()` that starts a local cluster writes one to ~/.ray/auth_token). Both ways
promptfleet talks to a cluster need the token:

- `promptfleet submit` / `jobs` talk HTTP to the job server and send it as a bearer header
  (`cluster.jobs.auth_headers`);
- `promptfleet train --address HOST:PORT` joins the cluster as a Ray driver. Ray itself looks for a
  token only when asked to (`RAY_AUTH_MODE=token`) or for `--address auto`; with an explicit address
  and the mode unset it retries `InvalidAuthToken` for ~20 s and fails. `enable_token_auth` turns the
  mode on for this process when `ray_auth_token` finds a token, so the driver joins as `submit` would.

The token comes from, in order: an explicit `token` (`--token`), RAY_AUTH_TOKEN, the file named by
RAY_AUTH_TOKEN_PATH, and ~/.ray/auth_token (which `ray start` and `ray get-auth-token --generate` use).
That last file is this machine's own: it is used for a cluster on this machine (a loopback address or
`auto`), or for any address once RAY_AUTH_MODE=token says so (as Ray's own loader does), never sent
to a remote address otherwise.

This module does not start clusters or hold tokens anywhere but in this process's environment.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from tuner.schema import shown

LOOPBACK = ("127.0.0.1", "localhost", "::1")
AUTH_MODE_VAR = "RAY_AUTH_MODE"


def is_local_address(address: str) -> bool:
    """Whether a Ray address (a job server URL, `HOST:PORT`, or `auto`) is a cluster on this machine."""
    if address == "auto":
        return True
    return urlparse(address if "://" in address else f"//{address}").hostname in LOOPBACK


def default_token_file() -> Path:
    return Path.home() / ".ray" / "auth_token"


def ray_auth_token(token: str | None = None, address: str = "") -> str | None:
    """This machine's token for the cluster at `address` (see the module docstring), or None."""
    token = token or os.environ.get("RAY_AUTH_TOKEN")
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if not token and path:
        token = Path(path).expanduser().read_text()
    local = default_token_file()
    token_mode = os.environ.get(AUTH_MODE_VAR, "").lower() == "token"
    if not token and (is_local_address(address) or token_mode) and local.is_file():
        token = local.read_text()
    return token.strip() if token and token.strip() else None


def enable_token_auth(address: str) -> bool:
    """Before `ray.init(address=...)` joins a cluster: turn Ray's token mode on for this process when
    RAY_AUTH_MODE is unset and a token is found (Ray then loads it from the same place). An explicit
    RAY_AUTH_MODE is left as it is. Returns whether the driver will send a token.

    A token sent to a cluster without authentication is ignored by it, so this never stops a join.
    """
    mode = os.environ.get(AUTH_MODE_VAR)
    if mode is not None:
        return mode.lower() == "token"
    token = ray_auth_token(None, address)
    if token is None:
        return False
    # Ray's loader then finds the token where `ray_auth_token` did (the variables, or ~/.ray/auth_token:
    # used here for a local address only). Ray caches the mode in its configuration: its own helper sets
    # the variable and refreshes that cache.
    from ray._private.authentication.authentication_token_setup import _enable_token_auth

    _enable_token_auth()
    return True


def is_auth_failure(e: BaseException) -> bool:
    """Whether `ray.init` failed because the cluster refused the token: Ray raises a ConnectionError around
    its `AuthenticationError`, or around a RuntimeError that quotes it as text (the GCS client's error)."""
    seen = 0
    while e is not None and seen < 16:
        if type(e).__name__ == "AuthenticationError" or "ray.exceptions.AuthenticationError" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def auth_failure_message(address: str) -> str:
    """One line for a driver the cluster at `address` refused (no token, or the wrong one)."""
    return (
        f"the Ray cluster at {shown(address)} refused this driver's token (or its lack of one): it uses token "
        "authentication; set RAY_AUTH_TOKEN=<the cluster's token> (`ray get-auth-token` on the head prints it) "
        "or RAY_AUTH_TOKEN_PATH=<a file holding it>"
    )
