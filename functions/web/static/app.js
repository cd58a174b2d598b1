// The export history refreshes itself while exports run: every two seconds the table fragment
// is fetched again and swapped in, keeping the keyboard focus on the same control. Without
// script the page works the same; the history is then current as of the last load.
(function () {
  "use strict";
  var history = document.getElementById("history");
  if (!history || !window.fetch) {
    return;
  }
  var source = history.getAttribute("data-source");
  var delay = 2000;

  function running() {
    return history.querySelector("[data-pending]") !== null;
  }

  function refresh() {
    fetch(source, { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (response) {
        if (response.redirected || !response.ok) {
          // Signed out or the session expired: a full load shows the sign-in.
          if (response.status === 401 || response.redirected) {
            window.location.reload();
          }
          throw new Error("history " + response.status);
        }
        return response.text();
      })
      .then(function (html) {
        var focused = document.activeElement && document.activeElement.id;
        var template = document.createElement("template");
        template.innerHTML = html;
        history.replaceChildren(template.content);
        if (focused) {
          var again = document.getElementById(focused);
          if (again) {
            again.focus();
          }
        }
        schedule();
      })
      .catch(function () {
        delay = Math.min(delay * 2, 30000);
        schedule();
      });
  }

  function schedule() {
    if (running()) {
      window.setTimeout(refresh, delay);
    }
  }

  schedule();
})();
