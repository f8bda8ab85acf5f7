"""Prefect flows, the `cai` command line, deployments and schedules."""

import os

# A flow run without PREFECT_API_URL starts a temporary local server; on a busy 2-core machine
# it can need more than Prefect's default 20 s to come up.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# torch's worker threads busy-wait by default; when another process shares the cores (a second
# worker, the Prefect server) that slows every step 3-10x. Passive waiting costs almost nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
