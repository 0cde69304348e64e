"""A verification worker process: JSON lines in on stdin, JSON lines out on stdout.

Started as `python -m perl.reward.worker` (not through multiprocessing), so it never re-imports
the caller's `__main__`: it works from scripts without a main guard, from threads and inside Ray
workers. It runs math-verify in its own main thread, where math-verify's signal timeouts work; the
pool adds a hard kill on top for anything that does not return.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from math_verify.errors import TimeoutException

    from perl.reward.verify import math_verify_equal

    out = sys.stdout
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            task = json.loads(line)
            correct = math_verify_equal(task["pred"], task["gold"], int(task.get("timeout", 5)))
            reply = {"correct": correct}
        except TimeoutException:
            reply = {"correct": False, "timeout": True}
        except Exception as e:  # unparsable or broken input scores 0; the worker lives on
            reply = {"correct": False, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
