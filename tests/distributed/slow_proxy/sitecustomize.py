"""Test-only: make Serve's HTTP proxy slow to start, on purpose (tests/distributed/test_serving_ray.py).

Python imports `sitecustomize` at startup from the first directory on its path that has one; the test puts
this directory on the PYTHONPATH of Serve's controller (through `serving.ray_app.SERVE_CONTROLLER_ENV`), and
the proxy actors the controller creates inherit that environment. Only Ray worker processes act on it, and
only while PROMPTFLEET_SLOW_PROXY_DIR names a directory:

- the first worker to start (the controller) claims `controller` in that directory and starts at once;
- the second (the proxy: the controller starts it before any replica) claims `proxy` and sleeps until
  PROMPTFLEET_SLOW_PROXY_S seconds after the controller started, then writes its PID and how long after the
  controller it woke in `proxy`;
- later workers (replicas) start at once.

A proxy that answers its readiness check 30 s after the controller started has missed Ray's default
check three times (5 s each) and been killed, so `serve.start` fails; it is what a busy 2-core node did.
"""

import os
import sys
import time


def _claim(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _slow_proxy_start(directory: str, delay_s: float) -> None:
    controller = os.path.join(directory, "controller")
    if _claim(controller):
        return
    proxy = os.path.join(directory, "proxy")
    if not _claim(proxy):
        return
    wake_at = os.stat(controller).st_mtime + delay_s
    time.sleep(max(0.0, wake_at - time.time()))
    with open(proxy, "w") as f:
        f.write(f"{os.getpid()} {time.time() - os.stat(controller).st_mtime:.1f}")


if os.environ.get("PROMPTFLEET_SLOW_PROXY_DIR") and sys.argv and sys.argv[0].endswith("default_worker.py"):
    _slow_proxy_start(
        os.environ["PROMPTFLEET_SLOW_PROXY_DIR"], float(os.environ.get("PROMPTFLEET_SLOW_PROXY_S", "30"))
    )
