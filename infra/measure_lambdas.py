#!/usr/bin/env python3
"""Measures each Lambda binary's size (raw and zipped as `bootstrap`) and init time.

Init time is the time from process start until the function first asks the Lambda Runtime API
for an invocation (GET /2018-06-01/runtime/invocation/next): the work Lambda bills as Init. A
small fake Runtime API on 127.0.0.1 records that moment; no AWS call is made during init.

Usage: measure_lambdas.py TARGET_DIR [RUNS]   (e.g. target/release)
"""
import http.server
import io
import os
import statistics
import subprocess
import sys
import threading
import time
import zipfile

target = sys.argv[1]
runs = int(sys.argv[2]) if len(sys.argv) > 2 else 10
first_poll = threading.Event()


class RuntimeApi(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server naming)
        if self.path.endswith("/runtime/invocation/next"):
            first_poll.set()
            time.sleep(5)  # hold the long poll; the process is killed meanwhile
        self.send_response(500)
        self.end_headers()

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RuntimeApi)
threading.Thread(target=server.serve_forever, daemon=True).start()
env = dict(
    os.environ,
    AWS_LAMBDA_RUNTIME_API=f"127.0.0.1:{server.server_address[1]}",
    AWS_LAMBDA_FUNCTION_NAME="measure",
    AWS_LAMBDA_FUNCTION_MEMORY_SIZE="256",
    AWS_LAMBDA_FUNCTION_VERSION="$LATEST",
    AWS_LAMBDA_LOG_STREAM_NAME="measure",
    AWS_LAMBDA_LOG_GROUP_NAME="measure",
    AWS_REGION="us-east-1",
    AWS_ACCESS_KEY_ID="x",
    AWS_SECRET_ACCESS_KEY="x",
    RESOURCES_TABLE="resources",
    JOBS_TABLE="jobs",
    EXPORT_BUCKET="bucket",
    STATE_MACHINE_ARN="arn:aws:states:us-east-1:123456789012:stateMachine:export",
    WORK_QUEUE_URL="https://sqs.us-east-1.amazonaws.com/123456789012/work",
)
print(f"{'function':<12} {'binary MB':>10} {'zip MB':>8} {'init ms (median of ' + str(runs) + ')':>26}")
for name in ["api", "worker", "coordinator"]:
    path = os.path.join(target, name)
    data = open(path, "rb").read()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("bootstrap", data)
    times = []
    for _ in range(runs):
        first_poll.clear()
        started = time.perf_counter()
        process = subprocess.Popen([path], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not first_poll.wait(10):
            process.kill()
            sys.exit(f"{name} never polled the Runtime API")
        times.append((time.perf_counter() - started) * 1000)
        process.kill()
        process.wait()
    print(f"{name:<12} {len(data) / 1e6:>10.1f} {len(buffer.getvalue()) / 1e6:>8.1f} {statistics.median(times):>26.1f}")
server.shutdown()
