"""sicot.lease: one holder at a time, on a local store and on a real S3 server."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sicot import storage
from sicot.lease import Lease, LeaseLost, LeaseTimeout, lease

REPO = Path(__file__).resolve().parents[1]


def state(uri: str) -> dict:
    return json.loads(storage.read_bytes(uri))


def check_one_holder_at_a_time(uri: str) -> None:
    with lease(uri, "a", ttl_s=30) as held:
        assert state(uri)["owner"] == "a" and state(uri)["held"]
        with pytest.raises(LeaseTimeout, match=r"held by a \(expires in"):
            with lease(uri, "b", wait_s=0.3, poll_s=0.05):
                pass
        held.renew()
    assert not state(uri)["held"]
    with lease(uri, "b", wait_s=0):
        assert state(uri)["owner"] == "b"


def check_expired_lease_is_taken_over(uri: str) -> None:
    dead = Lease(uri, "crashed", ttl_s=0.3)  # acquired without its renewing thread: a holder that died
    assert dead.try_acquire()
    time.sleep(0.4)
    with lease(uri, "next", wait_s=1, poll_s=0.05):
        with pytest.raises(LeaseLost, match="crashed"):
            dead.renew()
        dead.release()  # frees nothing: the lease is no longer its to free
        assert state(uri)["owner"] == "next" and state(uri)["held"]


def test_one_holder_at_a_time(tmp_path):
    check_one_holder_at_a_time(str(tmp_path / "locks" / "promote.json"))


def test_expired_lease_is_taken_over_and_its_old_holder_learns_it(tmp_path):
    check_expired_lease_is_taken_over(str(tmp_path / "promote.json"))


def test_a_live_holder_keeps_its_lease_past_the_ttl(tmp_path):
    uri = str(tmp_path / "promote.json")
    with lease(uri, "slow", ttl_s=0.3):
        time.sleep(1.0)  # three times the ttl: renewed in the background meanwhile
        assert not Lease(uri, "other", ttl_s=0.3).try_acquire()


def test_a_damaged_lease_file_is_named(tmp_path):
    uri = tmp_path / "promote.json"
    uri.write_text("not json")
    with pytest.raises(ValueError, match="promote.json: not a lease"):
        with lease(str(uri), "a", wait_s=0):
            pass


COUNTER = """
import sys, time
from pathlib import Path
from sicot.lease import lease
uri, counter = sys.argv[1], Path(sys.argv[2])
for _ in range(int(sys.argv[3])):
    with lease(uri, sys.argv[4], ttl_s=30, wait_s=60, poll_s=0.01):
        value = int(counter.read_text())
        time.sleep(0.005)  # read-modify-write with a gap: without mutual exclusion updates get lost
        counter.write_text(str(value + 1))
"""


def test_processes_never_hold_it_together(tmp_path):
    counter = tmp_path / "counter"
    counter.write_text("0")
    procs = [subprocess.Popen([sys.executable, "-c", COUNTER, str(tmp_path / "promote.json"), str(counter), "15",
                               f"worker-{i}"], cwd=REPO) for i in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    assert int(counter.read_text()) == 45


@pytest.mark.services
def test_lease_on_s3(s3_bucket):
    check_one_holder_at_a_time(f"{s3_bucket}/models/.locks/promote-a.json")
    check_expired_lease_is_taken_over(f"{s3_bucket}/models/.locks/promote-b.json")
