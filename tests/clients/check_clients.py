"""Real bulk clients from PyPI against `bulk-export serve`: smart-fetch and cumulus-etl.

Generates data with the real binary, serves it on 127.0.0.1, runs each client as a user would
(`smart-fetch bulk`, `cumulus-etl export`) at system and Group level, and compares what they
downloaded with counts computed here from the generated NDJSON by plain predicates.

    python3 tests/clients/check_clients.py BULK_EXPORT_BINARY SMART_FETCH CUMULUS_ETL WORKDIR
"""

import glob
import gzip
import json
import os
import shutil
import subprocess
import sys
from collections import Counter

# smart-fetch 1.0.3's default Observation filter (smart_fetch/filtering.py): these categories.
SMART_FETCH_CATEGORIES = {
    "social-history", "vital-signs", "imaging", "laboratory", "survey",
    "exam", "procedure", "therapy", "activity",
}


def read_ndjson(pattern):
    for path in sorted(glob.glob(pattern)):
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield json.loads(line)


def refs(resource, *fields):
    """Patient ids a resource points at through the given top-level reference fields."""
    out = set()
    for field in fields:
        value = resource.get(field)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, dict) and v.get("reference", "").startswith("Patient/"):
                out.add(v["reference"][len("Patient/"):])
    return out


def in_categories(observation):
    return any(
        coding.get("code") in SMART_FETCH_CATEGORIES
        for category in observation.get("category", [])
        for coding in category.get("coding", [])
    )


def downloaded(folder):
    """type -> ids the client wrote into `folder`, checking no resource came twice."""
    counts = {}
    # The clients write `<Type>.<n>.ndjson[.gz]` beside their own `log.ndjson`.
    for resource in read_ndjson(os.path.join(folder, "[A-Z]*.ndjson*")):
        ids = counts.setdefault(resource["resourceType"], [])
        ids.append(resource["id"])
    for t, ids in counts.items():
        assert len(ids) == len(set(ids)), f"{folder}: a {t} came twice"
    return {t: sorted(ids) for t, ids in counts.items()}


def run(cmd, **kw):
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    if result.returncode != 0:
        sys.exit(f"FAILED: {' '.join(cmd)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


def check(label, got, want):
    if got != want:
        missing = sorted(set(want) - set(got))[:5]
        extra = sorted(set(got) - set(want))[:5]
        sys.exit(f"FAILED {label}: got {len(got)}, want {len(want)} (missing {missing}, extra {extra})")
    print(f"ok  {label}: {len(got)}")


def main():
    binary, smart_fetch, cumulus_etl, work = sys.argv[1:5]
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    data = os.path.join(work, "data")
    db = os.path.join(work, "store.db")
    run([binary, "generate", "--patients", "15", "--out", data, "--seed", "7"])
    run([binary, "load", "--db", db, data])
    resources = list(read_ndjson(os.path.join(data, "*.ndjson")))
    by_type = {}
    for r in resources:
        by_type.setdefault(r["resourceType"], []).append(r)

    server, base = start_server(binary, db, work, "server.log", [])
    try:

        group = by_type["Group"][0]
        members = {m["entity"]["reference"].split("/", 1)[1] for m in group["member"]}
        ids = lambda rs: sorted(r["id"] for r in rs)  # noqa: E731

        # smart-fetch, system level, its default types and filter.
        out = os.path.join(work, "smart-fetch-system")
        run([smart_fetch, "bulk", "--fhir-url", base, out])
        got = downloaded(out)
        want_obs = ids(o for o in by_type["Observation"] if in_categories(o))
        assert 0 < len(want_obs) < len(by_type["Observation"]), "the data must test the filter"
        check("smart-fetch system Observation (default category filter)", got.get("Observation", []), want_obs)
        for t in ("Patient", "Condition", "Encounter", "Immunization", "MedicationRequest", "Procedure"):
            check(f"smart-fetch system {t}", got.get(t, []), ids(by_type[t]))

        # smart-fetch, Group level.
        out = os.path.join(work, "smart-fetch-group")
        run([smart_fetch, "bulk", "--fhir-url", base, "--group", group["id"], out])
        got = downloaded(out)
        check("smart-fetch Group Patient", got.get("Patient", []), sorted(members))
        check(
            "smart-fetch Group Observation (default category filter)",
            got.get("Observation", []),
            ids(o for o in by_type["Observation"] if in_categories(o) and refs(o, "subject") & members),
        )

        # cumulus-etl, Group level (no default filter).
        out = os.path.join(work, "cumulus-etl-group")
        run([cumulus_etl, "export", f"{base}/Group/{group['id']}", out])
        got = downloaded(out)
        check("cumulus-etl Group Patient", got.get("Patient", []), sorted(members))
        for t, fields in (("Observation", ("subject",)), ("Condition", ("subject",)),
                          ("Encounter", ("subject",)), ("Immunization", ("patient",)),
                          ("Procedure", ("subject",))):
            check(f"cumulus-etl Group {t}", got.get(t, []),
                  ids(r for r in by_type[t] if refs(r, *fields) & members))
    finally:
        server.terminate()
        server.wait()

    check_log(work, "server.log", deletes=3)
    check_with_authentication(binary, smart_fetch, cumulus_etl, work, db, by_type)


def start_server(binary, db, work, log_name, extra):
    server = subprocess.Popen(
        [binary, "serve", "--addr", "127.0.0.1:0", "--db", db,
         "--output", os.path.join(work, "exports")] + extra,
        stdout=subprocess.PIPE, stderr=open(os.path.join(work, log_name), "w"), text=True,
    )
    for line in server.stdout:
        if line.startswith("FHIR Bulk Data server listening on "):
            return server, line.split(" on ", 1)[1].strip()
    sys.exit("the server did not start")


def check_with_authentication(binary, smart_fetch, cumulus_etl, work, db, by_type):
    """The same clients as SMART Backend Services clients of `serve --auth on`: a key made by
    tests/clients/smart_client.py (the README's script), registered with `clients add`."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smart_client.py")
    python = os.path.join(os.path.dirname(smart_fetch), "python")
    key, jwks = os.path.join(work, "client.pem"), os.path.join(work, "client.jwks.json")
    run([python, script, "keygen", "--kid", "k1", "--key", key, "--jwks", jwks])
    run([binary, "clients", "add", "--db", db, "--id", "etl-client", "--jwks", jwks,
         "--scope", "system/*.read"])
    server, base = start_server(binary, db, work, "server-auth.log", ["--auth", "on"])
    try:
        origin = base.rsplit("/fhir", 1)[0]
        token = run([python, script, "token", "--token-url", f"{origin}/auth/token",
                     "--client-id", "etl-client", "--key", key, "--kid", "k1"]).stdout.strip()
        assert token.count(".") == 2, token
        # Without credentials the clients are refused; with them they export as before.
        refused = subprocess.run([smart_fetch, "bulk", "--fhir-url", base, os.path.join(work, "sf-refused")],
                                 capture_output=True, text=True, timeout=600)
        assert refused.returncode != 0, "an unauthenticated client must be refused"
        out = os.path.join(work, "smart-fetch-auth")
        run([smart_fetch, "bulk", "--fhir-url", base, "--smart-client-id", "etl-client",
             "--smart-key", key, out])
        got = downloaded(out)
        check("smart-fetch with SMART auth, Patient", got.get("Patient", []),
              sorted(r["id"] for r in by_type["Patient"]))
        want_obs = sorted(o["id"] for o in by_type["Observation"] if in_categories(o))
        check("smart-fetch with SMART auth, Observation", got.get("Observation", []), want_obs)
        group = by_type["Group"][0]
        members = sorted(m["entity"]["reference"].split("/", 1)[1] for m in group["member"])
        out = os.path.join(work, "cumulus-etl-auth")
        run([cumulus_etl, "export", f"{base}/Group/{group['id']}", out,
             "--smart-client-id", "etl-client", "--smart-key", key])
        check("cumulus-etl with SMART auth, Group Patient", downloaded(out).get("Patient", []), members)
    finally:
        server.terminate()
        server.wait()
    check_log(work, "server-auth.log", deletes=2)


def check_log(work, name, deletes):
    """Each client deleted its export when done; every request was logged, none failed."""
    log = [json.loads(line) for line in open(os.path.join(work, name))]
    requests = [line for line in log if line.get("message") == "request"]
    statuses = Counter((r["method"], r["route"], r["status"]) for r in requests)
    deleted = statuses[("DELETE", "/fhir/$export-status/{id}", 202)]
    assert deleted == deletes, f"each client deleted its export: {statuses}"
    errors = [r for r in requests if r["status"] >= 500] + [l for l in log if l.get("level") == "ERROR"]
    assert not errors, errors
    print(f"ok  {name}: {len(requests)} requests logged, every export deleted by its client")


if __name__ == "__main__":
    main()
