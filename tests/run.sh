#!/usr/bin/env bash
# Runs every test of the project:
#   formatting and clippy; the SAM template (`sam validate --lint`, cfn-lint 1.53.3) and the state
#   machine (asl-validator); unit tests; end-to-end tests of the local server over HTTP; the AWS
#   deployment against moto's server (started here on 127.0.0.1 and stopped at the end); and the real
#   bulk clients smart-fetch and cumulus-etl (from PyPI) against the local server; schemathesis against
#   the study API's OpenAPI document; the Exports page in headless Chromium (Debian's chromium,
#   Playwright for Python, axe-core from npm).
# Needs Rust, Python 3 with pip, and Node with npm; it installs the rest into .tools/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
TOOLS=$ROOT/.tools

echo "== tools (.tools/)"
if ! cmp -s tests/requirements.txt "$TOOLS/venv/requirements.txt" 2>/dev/null; then
  rm -rf "$TOOLS/venv"
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet --disable-pip-version-check -r tests/requirements.txt
  cp tests/requirements.txt "$TOOLS/venv/requirements.txt"
fi
if ! cmp -s tests/clients/requirements.txt "$TOOLS/clients/requirements.txt" 2>/dev/null; then
  rm -rf "$TOOLS/clients"
  python3 -m venv "$TOOLS/clients"
  "$TOOLS/clients/bin/pip" install --quiet --disable-pip-version-check -r tests/clients/requirements.txt
  cp tests/clients/requirements.txt "$TOOLS/clients/requirements.txt"
fi
if ! cmp -s tests/schemathesis-requirements.txt "$TOOLS/schemathesis/requirements.txt" 2>/dev/null; then
  rm -rf "$TOOLS/schemathesis"
  python3 -m venv "$TOOLS/schemathesis"
  "$TOOLS/schemathesis/bin/pip" install --quiet --disable-pip-version-check -r tests/schemathesis-requirements.txt
  cp tests/schemathesis-requirements.txt "$TOOLS/schemathesis/requirements.txt"
fi
if ! cmp -s tests/browser/requirements.txt "$TOOLS/browser/requirements.txt" 2>/dev/null; then
  rm -rf "$TOOLS/browser"
  python3 -m venv "$TOOLS/browser"
  "$TOOLS/browser/bin/pip" install --quiet --disable-pip-version-check -r tests/browser/requirements.txt
  cp tests/browser/requirements.txt "$TOOLS/browser/requirements.txt"
fi
if ! cmp -s tests/lambda-requirements.txt "$TOOLS/lambda/requirements.txt" 2>/dev/null; then
  rm -rf "$TOOLS/lambda"
  python3 -m venv "$TOOLS/lambda"
  "$TOOLS/lambda/bin/pip" install --quiet --disable-pip-version-check -r tests/lambda-requirements.txt
  cp tests/lambda-requirements.txt "$TOOLS/lambda/requirements.txt"
fi
# A CI run builds once from nothing: incremental caches would only add gigabytes to target/.
export CARGO_INCREMENTAL=0
# functions/aws/tests/emulator.rs runs the Lambda binaries under its runtime emulator.
export CARGO_LAMBDA=$TOOLS/lambda/bin/cargo-lambda
if [ ! -x /usr/bin/chromium ]; then
  # The Debian package: Playwright's own browser download does not work here.
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium > /dev/null
fi
AXE=$TOOLS/node/node_modules/axe-core/axe.min.js
if [ ! -f "$AXE" ]; then
  npm install --silent --prefix "$TOOLS/node" --no-audit --no-fund axe-core@4.14.1
fi
ASL_VALIDATOR=$TOOLS/node/node_modules/.bin/asl-validator
if [ ! -x "$ASL_VALIDATOR" ]; then
  npm install --silent --prefix "$TOOLS/node" --no-audit --no-fund asl-validator@4.0.0
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
cargo clippy -p bulk-export --features aws --all-targets -- -D warnings

echo "== state machine (asl-validator)"
python3 infra/render_asl.py \
  CoordinatorQueueUrl=https://sqs.us-east-1.amazonaws.com/123456789012/coordinator \
  WorkQueueUrl=https://sqs.us-east-1.amazonaws.com/123456789012/work \
  MapConcurrency=16 HeartbeatSeconds=300 \
  < infra/statemachine.asl.json > "$TOOLS/statemachine.rendered.json"
"$ASL_VALIDATOR" --json-path "$TOOLS/statemachine.rendered.json"

echo "== SAM template (sam validate --lint)"
AWS_DEFAULT_REGION=us-east-1 SAM_CLI_TELEMETRY=0 "$TOOLS/venv/bin/sam" validate --lint --template template.yaml
"$TOOLS/venv/bin/cfn-lint" template.yaml
# Logs, tracing, alarms, retention and memory stay in the template (the check also proves it fails
# when one of them is removed).
"$TOOLS/venv/bin/python" tests/check_template.py template.yaml

# moto keeps every item and object in memory: each AWS test file gets a server of its own
# (started by start_moto, stopped by stop_moto), so what one file stores never adds up across files.
MOTO_PID=""
start_moto() {
  MOTO_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  export MOTO_PORT
  MOTO_PORT=$MOTO_PORT "$TOOLS/venv/bin/python" tests/moto_server.py -H 127.0.0.1 -p "$MOTO_PORT" > "$TOOLS/moto-$1.log" 2>&1 &
  MOTO_PID=$!
  for _ in $(seq 1 100); do
    if python3 -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$MOTO_PORT/moto-api/')" 2>/dev/null; then break; fi
    sleep 0.2
  done
  export MOTO_ENDPOINT=http://127.0.0.1:$MOTO_PORT
  echo "moto on $MOTO_ENDPOINT for $1"
}
stop_moto() {
  kill "$MOTO_PID" 2>/dev/null || true
  wait "$MOTO_PID" 2>/dev/null || true
  MOTO_PID=""
}
trap 'stop_moto' EXIT

echo "== build the binaries the end-to-end tests drive"
cargo build --workspace --bins
# The AWS tests also run `bulk-export load --dynamodb-table`, which needs the aws feature; the copy
# survives `cargo test` rebuilding the plain binary.
cargo build -p bulk-export --features aws --bin bulk-export
cp target/debug/bulk-export target/debug/bulk-export-aws

echo "== cargo test"
cargo test --workspace --all-targets --exclude export-aws
cargo test -p export-aws --lib
echo "== the AWS deployment against moto, one server per test file"
for test_file in functions/aws/tests/*.rs; do
  name=$(basename "$test_file" .rs)
  # The fan-out tests each keep moto's one core busy for minutes: one at a time, so neither
  # waits on the other's requests (and moto holds one big job's items at a time).
  threads=()
  [ "$name" = fanout ] && threads=(-- --test-threads=1)
  start_moto "$name"
  cargo test -p export-aws --test "$name" "${threads[@]}"
  stop_moto
done
start_moto benches
cargo test -p export-aws --benches
stop_moto

echo "== schemathesis: the study API against its OpenAPI document"
ST_DIR=$TOOLS/schemathesis-run
rm -rf "$ST_DIR" && mkdir -p "$ST_DIR"
ST_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
target/debug/bulk-export serve --addr "127.0.0.1:$ST_PORT" --db "$ST_DIR/store.db" --output "$ST_DIR/exports" \
  --sample 20 --auth on --request-rate 100000 > "$ST_DIR/serve.out" 2> "$ST_DIR/serve.log" &
ST_PID=$!
trap 'kill $ST_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do grep -q "listening on" "$ST_DIR/serve.out" 2>/dev/null && break; sleep 0.2; done
target/debug/bulk-export users add --db "$ST_DIR/store.db" --email schemathesis@example.org --name Schemathesis
target/debug/bulk-export members grant --db "$ST_DIR/store.db" --user schemathesis@example.org --study study-0 --role study-admin
ST_TOKEN=$(target/debug/bulk-export token --db "$ST_DIR/store.db" --user schemathesis@example.org --ttl 1h)
(cd tests && "$TOOLS/schemathesis/bin/schemathesis" run "http://127.0.0.1:$ST_PORT/api/v1/openapi.json" \
  -H "Authorization: Bearer $ST_TOKEN" --checks all --max-examples 50 --seed 1)
kill $ST_PID 2>/dev/null || true

echo "== the Exports page in headless Chromium (Playwright, axe-core)"
"$TOOLS/browser/bin/python" tests/browser/check_page.py target/debug/bulk-export "$AXE" target/browser-artifacts

echo "== real bulk clients (smart-fetch, cumulus-etl) against bulk-export serve"
python3 tests/clients/check_clients.py target/debug/bulk-export \
  "$TOOLS/clients/bin/smart-fetch" "$TOOLS/clients/bin/cumulus-etl" "$TOOLS/clients-work"

echo "== disk: target/ $(du -sh target 2>/dev/null | cut -f1), .tools/ $(du -sh "$TOOLS" 2>/dev/null | cut -f1)"
