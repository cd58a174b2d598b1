// The export history refreshes itself while exports run: every two seconds the table fragment
// is fetched again and swapped in. Status changes are announced in a live region that stays
// (the table itself is not live), updates can be paused (WCAG 2.2.2), and the keyboard focus
// stays on the same control, or moves to the history's heading if that control is gone.
// Without script the page works the same; the history is then current as of the last load.
(function () {
  "use strict";
  var summary = document.getElementById("form-error");
  if (summary) {
    summary.focus();
  }
  var history = document.getElementById("history");
  if (!history || !window.fetch) {
    return;
  }
  var source = history.getAttribute("data-source");
  var status = document.getElementById("history-status");
  var pause = document.getElementById("history-pause");
  var heading = document.getElementById("history-heading");
  var delay = 2000;
  var paused = false;
  var timer = null;

  function running() {
    return history.querySelector("[data-pending]") !== null;
  }

  function statuses() {
    var seen = {};
    history.querySelectorAll("tr[id^='job-']").forEach(function (row) {
      var label = row.querySelector(".status");
      seen[row.id] = { status: row.getAttribute("data-status"), text: label ? label.textContent : "",
        name: row.getAttribute("data-label") };
    });
    return seen;
  }

  function announce(before, after) {
    var news = [];
    Object.keys(after).forEach(function (id) {
      if (before[id] && before[id].status !== after[id].status) {
        news.push(after[id].name + ": " + after[id].text + ".");
      }
    });
    if (news.length) {
      status.textContent = news.join(" ");
    }
  }

  function refresh() {
    timer = null;
    fetch(source, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (response) {
        if (response.status === 401) {
          // The session ended: a full load shows the sign-in.
          window.location.reload();
        }
        if (!response.ok) {
          throw new Error("history " + response.status);
        }
        return response.text();
      })
      .then(function (html) {
        var focused = document.activeElement && history.contains(document.activeElement)
          ? document.activeElement.id : null;
        var before = statuses();
        var template = document.createElement("template");
        template.innerHTML = html;
        history.replaceChildren(template.content);
        announce(before, statuses());
        if (focused) {
          var again = document.getElementById(focused);
          (again || heading).focus();
        }
        delay = 2000;
        schedule();
      })
      .catch(function () {
        delay = Math.min(delay * 2, 30000);
        schedule();
      });
  }

  function schedule() {
    if (pause) {
      pause.hidden = !running() && !paused;
    }
    if (!paused && running() && timer === null) {
      timer = window.setTimeout(refresh, delay);
    }
  }

  if (pause) {
    pause.addEventListener("click", function () {
      paused = !paused;
      pause.setAttribute("aria-pressed", paused ? "true" : "false");
      pause.textContent = paused ? "Resume updates" : "Pause updates";
      if (!paused) {
        refresh();
      } else if (timer !== null) {
        window.clearTimeout(timer);
        timer = null;
      }
    });
  }
  schedule();
})();
