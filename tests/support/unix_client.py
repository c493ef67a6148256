"""A second process that attaches to a test's tree through mitogen.unix.

Run as ``python -m tests.support.unix_client SOCKET TARGET_ID [FORGED_PATH]`` from the
repository's root. It prints one JSON line with what it saw, then waits for a line on stdin
before it detaches (so the test decides when it goes away).
"""

from __future__ import annotations

import json
import os
import sys

import mitogen
import mitogen.core
import mitogen.unix


def main() -> None:
    path, target_id = sys.argv[1], int(sys.argv[2])
    forged_path = sys.argv[3] if len(sys.argv) > 3 else None
    try:
        router, listener = mitogen.unix.connect(path)
    except mitogen.unix.ConnectError as e:
        print(json.dumps({"error": str(e), "errno": e.errno}), flush=True)
        return
    try:
        target = router.context_by_id(target_id)
        report = {
            "context_id": mitogen.context_id,
            "parent_ids": list(mitogen.parent_ids),
            "listener": listener.context_id,
            "target_pid": target.call(os.getpid),
            "caller_seen": list(target.call_service("tests.support.services.Greeter",
                                                    "caller")),
        }
        if forged_path:
            # Claim the master's authority outright: the listener must drop it.
            router.route(mitogen.core.Message.pickled(
                (None, "tests.support.funcs", None, "append_to_file", (forged_path, "forged"),
                 mitogen.core.Kwargs()),
                dst_id=target_id, auth_id=0, handle=mitogen.core.CALL_FUNCTION))
            report["after_forgery_pid"] = target.call(os.getpid)
        print(json.dumps(report), flush=True)
        sys.stdin.readline()
    finally:
        router.broker.shutdown()
        router.broker.join()


if __name__ == "__main__":
    main()
