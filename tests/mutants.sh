#!/usr/bin/env bash
# The mutation score of the core's rule modules: cargo-mutants changes the code one small way at a
# time (a `>` into `>=`, a function body into `Default::default()`, ...) and runs the tests that
# exercise it; a mutant the tests still pass is a behaviour no test pins down. Not part of CI (it
# rebuilds once per mutant: about two hours on 2 cores); run it like a benchmark:
#
#   bash tests/mutants.sh            # then read target/mutants/summary.txt
#
# Rule modules with unit tests (params, compartment, _typeFilter, _elements) are checked against
# export-core's unit tests; manifest.rs and organize.rs, which the engine drives through the
# ports, against the end-to-end tests that drive the real binary.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=$PWD/.tools
if [ ! -x "$TOOLS/cargo/bin/cargo-mutants" ]; then
  cargo install --locked cargo-mutants@27.1.0 --root "$TOOLS/cargo"
fi
export PATH=$TOOLS/cargo/bin:$PATH
OUT=${MUTANTS_OUT:-$PWD/target/mutants}
mkdir -p "$OUT/unit" "$OUT/e2e"

echo "== rule modules against export-core's unit tests"
cargo mutants --package export-core --jobs 1 --timeout 120 --output "$OUT/unit" \
  -f functions/core/src/params.rs -f functions/core/src/fhir/compartment.rs \
  -f 'functions/core/src/type_filter/*.rs' -f functions/core/src/elements.rs || true

echo "== manifest.rs and organize.rs against the end-to-end tests"
# cargo-mutants runs its unmutated baseline with the tests of the mutated package (export-core), which
# has no `spec_features` target, so that baseline always fails: the unmutated tree is checked here
# instead and cargo-mutants skips its own. For each mutant it builds with `cargo test --no-run` over
# the test packages (the `--test` filters only reach the test run), and building bulk-export's own
# integration tests builds the `bulk-export` binary into the copy's target/debug, next to the e2e
# test executables, where the tests look for it.
E2E_TESTS=(--test spec_features --test http_export --test interop)
if cargo build --bins -p bulk-export && cargo test -p e2e-tests "${E2E_TESTS[@]}"; then
  cargo mutants --package export-core --baseline skip --jobs 1 --timeout 300 --output "$OUT/e2e" \
    --test-package bulk-export --test-package e2e-tests \
    -f functions/core/src/manifest.rs -f functions/core/src/organize.rs \
    -- "${E2E_TESTS[@]}" || true
else
  echo "the end-to-end tests fail on the unmutated tree: manifest.rs and organize.rs not measured" >&2
fi

python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
rows, total = [], {"caught": 0, "missed": 0, "timeout": 0, "unviable": 0}
for run in ("unit", "e2e"):
    path = os.path.join(out, run, "mutants.out", "outcomes.json")
    if not os.path.exists(path):
        continue
    by_file = {}
    for o in json.load(open(path))["outcomes"]:
        if o["scenario"] == "Baseline":
            continue
        m = o["scenario"]["Mutant"]
        kind = {"CaughtMutant": "caught", "MissedMutant": "missed", "Timeout": "timeout",
                "Unviable": "unviable"}.get(o["summary"], o["summary"].lower())
        f = by_file.setdefault(m["file"], {"caught": 0, "missed": 0, "timeout": 0, "unviable": 0})
        f[kind] = f.get(kind, 0) + 1
        total[kind] = total.get(kind, 0) + 1
    rows += sorted(by_file.items())
lines = [f"{'file':45} caught missed timeout unviable"]
for f, c in rows:
    lines.append(f"{f:45} {c['caught']:6} {c['missed']:6} {c['timeout']:7} {c['unviable']:8}")
viable = total["caught"] + total["missed"] + total["timeout"]
score = 100.0 * (total["caught"] + total["timeout"]) / viable if viable else 0.0
lines.append(f"{'total':45} {total['caught']:6} {total['missed']:6} {total['timeout']:7} {total['unviable']:8}")
lines.append(f"caught (timeouts count as caught): {score:.1f}% of {viable} viable mutants")
text = "\n".join(lines)
print(text)
open(os.path.join(out, "summary.txt"), "w").write(text + "\n")
PY
