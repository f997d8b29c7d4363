"""Prefect flows: wiring only.

Without `PREFECT_API_URL` a flow starts Prefect's temporary (ephemeral) server, a subprocess that inherits
this environment. Two defaults for that server only (a real server keeps its own settings):
- its startup takes longer than Prefect's default 20 s on a small machine;
- its telemetry heartbeat would run while it starts: it reads and then writes the server's SQLite database
  in one deferred transaction, which SQLite refuses with "database is locked" once another service wrote
  meanwhile (an ERROR and a 40-line traceback before the first step), and offline it cannot reach
  prefect.io at all. A run on one's own machine sends none.
"""
import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
