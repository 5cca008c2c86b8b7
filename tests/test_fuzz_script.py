"""bench/fuzz.py's parts that need no server: the hooks module it loads into schemathesis (threads
that parse Python source at once), and how it reads the upload-id routes' answers from an access
log. The fuzz itself runs in tests/test_soak.py (reduced) and `make fuzz`."""

from __future__ import annotations

import subprocess
import sys

from bench.fuzz import HOOKS, NEED_AN_UPLOAD, phase_outcomes, read_log

RACE = """
import argparse, ast, gc, inspect, runpy, sys, threading, time
runpy.run_path(sys.argv[1])
assert ast.parse.__wrapped__ is not ast.parse
source = inspect.getsource(argparse)
gc.callbacks.append(lambda phase, info: time.sleep(0.001))  # a collection hands the GIL over
gc.set_threshold(50)
errors = []
def parse():
    for _ in range(3):
        try:
            ast.parse(source)
        except SystemError as exc:
            errors.append(str(exc))
threads = [threading.Thread(target=parse) for _ in range(2)]
[t.start() for t in threads]
[t.join() for t in threads]
print(errors)
sys.exit(1 if errors else 0)
"""


def test_the_hooks_let_two_threads_parse_at_once():
    """Two threads parsing a large module while collections hand the GIL over: on CPython 3.11.7
    (this machine's) that raises `SystemError: AST constructor recursion depth mismatch` now and
    then, as it did in schemathesis' coverage phase with two workers; with the hooks loaded, never."""
    argv = [sys.executable, "-c", RACE, str(HOOKS)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


LOG = """\
INFO:     127.0.0.1:1 - "POST /v1/weights/uploads HTTP/1.1" 201 Created
INFO:     127.0.0.1:1 - "GET /v1/weights/uploads/{ID} HTTP/1.1" 200 OK
INFO:     127.0.0.1:1 - "GET /v1/weights/uploads/%00x HTTP/1.1" 404 Not Found
INFO:     127.0.0.1:1 - "PUT /v1/weights/uploads/{ID}/shards/a?x=1 HTTP/1.1" 400 Bad
INFO:     127.0.0.1:1 - "POST /v1/weights/uploads/{ID}/commit HTTP/1.1" 400 Bad
INFO:     127.0.0.1:1 - "POST /v1/weights/uploads/{ID} HTTP/1.1" 405 Method
INFO:     127.0.0.1:1 - "DELETE /v1/weights/uploads/{ID} HTTP/1.1" 404 Not Found
INFO:     127.0.0.1:1 - "DELETE /v1/critic/weights/uploads/0 HTTP/1.1" 404 Not Found
""".replace("{ID}", "1841c1e1e7f148f4b586f00714bce927")  # an id of the server's form


def test_the_upload_id_routes_answers_are_read_by_route_and_by_where_the_id_came_from():
    result: dict = {}
    read_log(result, LOG)
    assert result["upload_id_answers"] == {
        "DELETE /v1/critic/weights/uploads/{upload_id}": {"other": {"404": 1}},
        "DELETE /v1/weights/uploads/{upload_id}": {"handed_out": {"404": 1}},
        "GET /v1/weights/uploads/{upload_id}": {"handed_out": {"200": 1}, "other": {"404": 1}},
        "POST /v1/weights/uploads/{upload_id}/commit": {"handed_out": {"400": 1}},
        "PUT /v1/weights/uploads/{upload_id}/shards/{shard}": {"handed_out": {"400": 1}},
    }  # the 405 (a method the route does not take) is left out
    assert set(NEED_AN_UPLOAD) <= set(result["upload_id_answers"])
    assert result["weight_upload_and_file_answers"] == {"uploads": 7}


SUMMARY = """
 🚫  Coverage (in 41.68s)
=================================== SUMMARY ====================================

Test Phases:
  ⏭  Examples (disabled)
  🚫 Coverage
  ❌ Fuzzing
  ✅ Stateful
"""


def test_the_phases_outcomes_are_read_from_schemathesis_summary():
    """The summary the crashed coverage phase left ("🚫"): bench/fuzz.py's check that every
    phase ran fails on it."""
    assert phase_outcomes(SUMMARY) == {
        "examples": "skipped", "coverage": "errored", "fuzzing": "failed", "stateful": "passed"
    }  # fmt: skip
