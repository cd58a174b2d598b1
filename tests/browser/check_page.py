"""The Exports page in a real browser (headless Chromium driven by Playwright).

Starts `bulk-export serve --auth on` on generated data with users who sign in with passwords at
the server's own OpenID provider, then, as a study administrator: signs in, creates every export
type, waits for each to complete (the history refreshes itself), downloads it and checks its
content against what this script computes from the generated NDJSON; opens the report and the
dashboard; reads the audit trail. As site staff: sees only their site and their own jobs. An
expired job asks to be generated again; sign-out ends the session; a cross-site POST is refused;
axe-core reports no serious or critical violation on any page, and no page breaks its CSP.

Usage: check_page.py BULK_EXPORT_BINARY AXE_JS ARTIFACT_DIR
Screenshots of each page go to ARTIFACT_DIR.
"""

import csv
import io
import json
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

BINARY, AXE, ARTIFACTS = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
ARTIFACTS.mkdir(parents=True, exist_ok=True)
STUDY = "study-0"
ADMIN = ("ana@example.org", "Ana Silva", "correct horse battery 1")
SITE_USER = ("sam@example.org", "Sam Site", "correct horse battery 2")
REVIEWER = ("rui@example.org", "Rui Review", "correct horse battery 3")
# FHIR JSON last: the server reads pages slowly (`--page-delay-ms`), so that export is still running
# when the page shows it, and the page has a change of status to announce.
TYPES = {
    "sites_csv": "Sites CSV",
    "participants_csv": "Participants CSV",
    "dashboard": "Dashboard",
    "report": "Study report",
    "fhir": "FHIR JSON",
}


def run(*args, stdin=None):
    done = subprocess.run([BINARY, *args], input=stdin, capture_output=True, text=True)
    assert done.returncode == 0, f"bulk-export {args}: {done.stdout}{done.stderr}"
    return done.stdout


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_ndjson(directory):
    resources = []
    for path in sorted(Path(directory).glob("*.ndjson")):
        resources += [json.loads(line) for line in path.read_text().splitlines() if line]
    return resources


# ---------------------------------------------------------------------------------------------
# What the exports must hold, computed here from the generated data.

SITE_EXTENSION = "http://bulk-export.org/fhir/StructureDefinition/research-subject-site"


def study_facts(resources):
    study = next(r for r in resources if r["resourceType"] == "ResearchStudy" and r["id"] == STUDY)
    site_ids = [s["reference"].split("/")[-1] for s in study.get("site", [])]
    locations = {r["id"]: r for r in resources if r["resourceType"] == "Location"}
    participants = []
    for r in resources:
        if r["resourceType"] != "ResearchSubject" or r["study"]["reference"] != f"ResearchStudy/{STUDY}":
            continue
        site = next(
            (e["valueReference"]["reference"].split("/")[-1] for e in r.get("extension", []) if e["url"] == SITE_EXTENSION),
            "",
        )
        participants.append({"id": r["id"], "site": site, "status": r["status"],
                             "patient": r["individual"]["reference"].split("/")[-1]})
    return {
        "title": study["title"],
        "sites": [(s, locations[s]["name"]) for s in site_ids],
        "participants": participants,
    }


# ---------------------------------------------------------------------------------------------
# The server

class Server:
    def __init__(self, work):
        self.work = work
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.db = str(work / "store.db")
        self.log = open(work / "server.log", "w")
        self.process = subprocess.Popen(
            [BINARY, "serve", "--addr", f"127.0.0.1:{self.port}", "--db", self.db, "--output", str(work / "exports"),
             "--auth", "on", "--expiry-sweep-secs", "1", "--log-format", "text", "--page-delay-ms", "300"],
            stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while True:
            try:
                urllib.request.urlopen(self.base + "/fhir/metadata", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError):
                assert time.time() < deadline, "the server did not start"
                assert self.process.poll() is None, "the server exited"
                time.sleep(0.2)

    def stop(self):
        self.process.terminate()
        self.process.wait(10)


def prepare(work):
    data = work / "data"
    run("generate", "--patients", "60", "--out", str(data), "--seed", "11")
    run("load", "--db", str(work / "store.db"), str(data))
    facts = study_facts(read_ndjson(data))
    for email, name, password in (ADMIN, SITE_USER, REVIEWER):
        run("users", "add", "--db", str(work / "store.db"), "--email", email, "--name", name, "--password-stdin",
            stdin=password + "\n")
    db = str(work / "store.db")
    run("members", "grant", "--db", db, "--user", ADMIN[0], "--study", STUDY, "--role", "study-admin")
    run("members", "grant", "--db", db, "--user", SITE_USER[0], "--study", STUDY, "--role", "site-staff",
        "--site", facts["sites"][0][0])
    run("members", "grant", "--db", db, "--user", REVIEWER[0], "--study", STUDY, "--role", "data-reviewer")
    return facts


# ---------------------------------------------------------------------------------------------
# Checks in the browser

class Browser:
    """One person's browser: CSP violations and console errors are collected and fail the run."""

    def __init__(self, playwright, server, who):
        self.browser = playwright.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        self.context = self.browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
        self.page = self.context.new_page()
        self.server = server
        self.who = who
        self.problems = []
        self.page.on("console", lambda m: self.problems.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.problems.append(str(e)))

    def close(self):
        assert not self.problems, f"{self.who}: console errors (a CSP violation?): {self.problems}"
        self.browser.close()

    def shot(self, name):
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def sign_in(self, user):
        page = self.page
        page.goto(self.server.base + "/")
        expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
        page.get_by_label("E-mail address").fill(user[0])
        page.get_by_label("Password").fill(user[2])
        page.get_by_role("button", name="Sign in").click()
        page.wait_for_url(f"**/studies/{STUDY}/exports")
        expect(page.get_by_text(f"Signed in as {user[0]}")).to_be_visible()

    def generate(self, export_type, sites=(), statuses=()):
        """Creates an export from the form; returns the new job's row id."""
        page = self.page
        page.goto(f"{self.server.base}/studies/{STUDY}/exports")
        before = set(page.locator("tr[id^=job-]").evaluate_all("rows => rows.map(r => r.id)"))
        page.get_by_label(TYPES[export_type], exact=True).check()
        for site in sites:
            page.locator(f"input[name=site][value='{site}']").check()
        for status in statuses:
            page.get_by_label(status, exact=True).check()
        page.get_by_role("button", name="Generate export").click()
        expect(page.get_by_role("status")).to_contain_text("The export is queued")
        rows = set(page.locator("tr[id^=job-]").evaluate_all("rows => rows.map(r => r.id)"))
        new = rows - before
        assert len(new) == 1, f"one new row: {new}"
        return new.pop()

    def wait_completed(self, row):
        """Waits, without reloading, until the history shows the row completed."""
        expect(self.page.locator(f"#{row}")).to_have_attribute("data-status", "completed", timeout=60_000)

    def download(self, row):
        job = row.removeprefix("job-")
        with self.page.expect_download() as info:
            self.page.locator(f"#download-{job}").click()
        path = info.value.path()
        return info.value.suggested_filename, Path(path).read_bytes()

    def axe(self, name):
        """axe-core in the page as it is: the script is evaluated through the DevTools protocol, so
        the page's own CSP stays on."""
        self.page.evaluate(AXE.read_text())
        result = self.page.evaluate("async () => await axe.run(document, {resultTypes: ['violations']})")
        bad = [(v["id"], v["impact"], v["help"], [n["target"] for n in v["nodes"]][:3])
               for v in result["violations"] if v["impact"] in ("serious", "critical")]
        assert not bad, f"axe on {name}: {bad}"


def csv_rows(data):
    text = data.decode("utf-8")
    return list(csv.reader(io.StringIO(text)))


def check_admin(playwright, server, facts):
    b = Browser(playwright, server, "admin")
    page = b.page
    b.sign_in(ADMIN)
    b.shot("01-exports")
    b.axe("exports")
    participants = facts["participants"]

    # Every type, each downloaded and checked.
    rows = {t: b.generate(t) for t in TYPES}
    b.shot("02-history-running")
    assert page.locator(f"#{rows['fhir']}").get_attribute("data-status") != "completed", \
        "the FHIR export is still running when the page shows it"
    for export_type, row in rows.items():
        b.wait_completed(row)
    # The change was announced in the live region that outlives the table's refreshes.
    expect(page.locator("#history-status")).to_contain_text("Completed")
    b.shot("03-history-completed")
    b.axe("history")

    name, data = b.download(rows["participants_csv"])
    table = csv_rows(data)
    assert name == "participants.csv", name
    assert sorted(r[0] for r in table[1:]) == sorted(p["id"] for p in participants), "participants CSV rows"

    name, data = b.download(rows["sites_csv"])
    table = csv_rows(data)
    assert [(r[0], r[1]) for r in table[1:]] == facts["sites"], "sites CSV rows"
    totals = {r[0]: int(r[6]) for r in table[1:]}
    for site, _ in facts["sites"]:
        assert totals[site] == sum(1 for p in participants if p["site"] == site), f"site {site} total"

    name, data = b.download(rows["fhir"])
    archive = zipfile.ZipFile(io.BytesIO(data))
    manifest = json.loads(archive.read("manifest.json"))
    counts = {}
    for entry in manifest["output"]:
        counts[entry["type"]] = counts.get(entry["type"], 0) + entry["count"]
    patients = {p["patient"] for p in participants}
    assert counts.get("ResearchSubject") == len(participants), f"ResearchSubjects: {counts}"
    assert counts.get("Location") == len(facts["sites"]) and counts.get("ResearchStudy") == 1, counts
    exported_patients = {json.loads(line)["id"] for entry in manifest["output"] if entry["type"] == "Patient"
                         for line in archive.read(entry["file"]).decode().splitlines()}
    # Every participant's Patient; a Patient linked to one (Patient.link) is in its compartment too.
    assert patients <= exported_patients, "the participants' patients"
    subjects = {json.loads(line)["id"] for entry in manifest["output"] if entry["type"] == "ResearchSubject"
                for line in archive.read(entry["file"]).decode().splitlines()}
    assert subjects == {p["id"] for p in participants}, "the study's participants exactly"

    name, data = b.download(rows["dashboard"])
    archive = zipfile.ZipFile(io.BytesIO(data))
    dashboard = json.loads(archive.read("dashboard.json"))
    assert dashboard["participants_total"] == len(participants), "dashboard total"

    name, data = b.download(rows["report"])
    html = data.decode()
    assert facts["title"] in html and f"{len(participants)} selected of {len(participants)}" in html, "report"

    # A filtered export: one status.
    status = "withdrawn"
    row = b.generate("participants_csv", statuses=[status])
    b.wait_completed(row)
    _, data = b.download(row)
    assert sorted(r[0] for r in csv_rows(data)[1:]) == sorted(p["id"] for p in participants if p["status"] == status)

    # The report and the dashboard open in the browser, the chart included.
    page.locator(f"#view-{rows['report'].removeprefix('job-')}").click()
    expect(page.locator("h1")).to_contain_text("Study report")
    assert page.locator("svg[role=img]").count() == 1, "the report's chart"
    b.shot("04-report")
    page.go_back()
    page.locator(f"#view-{rows['dashboard'].removeprefix('job-')}").click()
    expect(page.get_by_role("heading", name="Dashboard", exact=True)).to_be_visible()
    assert page.locator("figure.chart svg").count() == 1, "the dashboard's chart"
    expect(page.get_by_role("region", name="Participants by site and status")).to_be_visible()
    b.shot("05-dashboard")
    b.axe("dashboard")

    # The audit trail has the downloads; filters work.
    page.goto(f"{server.base}/studies/{STUDY}/audit")
    page.get_by_label("Action").select_option("download")
    page.get_by_role("button", name="Filter").click()
    actions = page.locator("table.audit tbody tr td:nth-child(4)").all_inner_texts()
    assert actions and all(a == "download" for a in actions), f"audit filtered by action: {actions}"
    assert len(actions) >= 6, f"six downloads and two views at least: {actions}"
    b.shot("06-audit")
    b.axe("audit")
    page.goto(f"{server.base}/studies/{STUDY}/webhooks")
    expect(page.get_by_role("heading", name="Webhook deliveries")).to_be_visible()

    # Cancel asks first; deleting a finished export's files leaves an expired row.
    page.goto(f"{server.base}/studies/{STUDY}/exports")
    job = rows["sites_csv"].removeprefix("job-")
    page.locator(f"#delete-{job}").click()
    expect(page.get_by_role("heading", name="Delete this export's files?")).to_be_visible()
    b.shot("07-confirm-delete")
    b.axe("confirm")
    page.get_by_role("button", name="Yes, delete the files").click()
    expect(page.locator(f"#job-{job}")).to_have_attribute("data-status", "expired")

    # Retention: the sweep expires a job whose time is up; its row asks to generate it again.
    job = rows["participants_csv"].removeprefix("job-")
    with sqlite3.connect(server.db, timeout=10) as conn:
        assert conn.execute("UPDATE study_jobs SET expires = 1 WHERE id = ?", (job,)).rowcount == 1
    deadline = time.time() + 20
    while True:
        page.goto(f"{server.base}/studies/{STUDY}/exports")
        if page.locator(f"#job-{job}").get_attribute("data-status") == "expired":
            break
        assert time.time() < deadline, "the retention sweep expires the job"
        time.sleep(0.5)
    expect(page.locator(f"#job-{job}")).to_contain_text("generate it again")
    assert page.locator(f"#download-{job}").count() == 0, "no download once expired"
    b.shot("08-expired")
    page.locator(f"#retry-{job}").click()
    expect(page.get_by_role("status")).to_contain_text("queued again")
    newest = page.locator("tbody tr").first
    expect(newest).to_contain_text("Participants CSV")

    # A POST from another site is refused, even with the session cookie.
    cookies = "; ".join(f"{c['name']}={c['value']}" for c in b.context.cookies())
    request = urllib.request.Request(
        f"{server.base}/studies/{STUDY}/exports", method="POST",
        data=b"type=sites_csv&csrf=forged", headers={"Cookie": cookies, "Origin": "https://evil.example",
                                                     "Content-Type": "application/x-www-form-urlencoded"})
    try:
        urllib.request.urlopen(request)
        raise AssertionError("a cross-site POST was accepted")
    except urllib.error.HTTPError as e:
        assert e.code == 403, e.code

    # Sign-out ends the session: the old cookie no longer opens the page.
    page.goto(f"{server.base}/studies/{STUDY}/exports")
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_role("heading", name="You are signed out")).to_be_visible()
    b.shot("09-signed-out")
    request = urllib.request.Request(f"{server.base}/studies/{STUDY}/exports", headers={"Cookie": cookies})
    opener = urllib.request.build_opener(NoRedirect)
    try:
        opener.open(request)
        raise AssertionError("the old session still opens the page")
    except urllib.error.HTTPError as e:
        assert e.code == 303 and e.headers["Location"].startswith("/login"), (e.code, e.headers["Location"])
    page.goto(f"{server.base}/studies/{STUDY}/exports")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    b.shot("00-sign-in")
    b.axe("sign-in")

    # After signing in, only a path of this site is returned to (browsers drop the tab, which
    # would make "/<tab>/evil.example" the other site "//evil.example").
    page.goto(f"{server.base}/login?return_to=%2F%09%2Fevil.example")
    page.get_by_label("E-mail address").fill(ADMIN[0])
    page.get_by_label("Password").fill(ADMIN[2])
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()
    assert page.url.startswith(server.base + "/"), f"stayed on the site: {page.url}"
    b.close()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args):
        return None


def check_site_user(playwright, server, facts):
    b = Browser(playwright, server, "site staff")
    page = b.page
    b.sign_in(SITE_USER)
    own_site = facts["sites"][0][0]
    offered = page.locator("input[name=site]").evaluate_all("boxes => boxes.map(b => b.value)")
    assert offered == [own_site], f"site staff are offered their site only: {offered}"
    history = page.locator("tr[id^=job-]").count()
    assert history == 0, f"the administrator's jobs are not shown to site staff: {history}"
    row = b.generate("participants_csv")
    b.wait_completed(row)
    _, data = b.download(row)
    got = sorted(r[0] for r in csv_rows(data)[1:])
    assert got == sorted(p["id"] for p in facts["participants"] if p["site"] == own_site), "their site's participants"
    assert page.locator("tr[id^=job-]").count() == 1, "only their own job"
    nav = page.get_by_role("navigation", name="Study")
    assert nav.get_by_role("link", name="Audit trail").count() == 0, "no audit trail for site staff"
    b.shot("10-site-staff")
    b.close()


def check_reviewer(playwright, server):
    b = Browser(playwright, server, "data reviewer")
    b.sign_in(REVIEWER)
    offered = b.page.locator("input[name=type]").evaluate_all("radios => radios.map(r => r.value)")
    assert offered == ["fhir", "sites_csv", "participants_csv"], f"data reviewers create data exports: {offered}"
    b.close()


def main():
    with tempfile.TemporaryDirectory(prefix="page-") as tmp:
        work = Path(tmp)
        facts = prepare(work)
        assert facts["participants"] and len(facts["sites"]) >= 2, "the generated study has participants and sites"
        server = Server(work)
        try:
            with sync_playwright() as playwright:
                check_admin(playwright, server, facts)
                check_site_user(playwright, server, facts)
                check_reviewer(playwright, server)
        except BaseException:
            sys.stderr.write((work / "server.log").read_text()[-4000:])
            raise
        finally:
            server.stop()
    print(f"the page passed in a real browser; screenshots in {ARTIFACTS}")


if __name__ == "__main__":
    main()
