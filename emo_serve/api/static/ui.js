// emo-serve /ui: refresh the server-rendered page in place every few seconds (no framework,
// no build step). Images get a fresh query so the browser asks for the new heatmaps.
"use strict";
(function () {
  const PERIOD_MS = 10000;
  const status = document.getElementById("refresh-status");

  function bust(root) {
    const stamp = Date.now();
    for (const img of root.querySelectorAll("img[data-src]")) {
      img.src = img.dataset.src + "&t=" + stamp;
    }
  }

  async function refresh() {
    try {
      const response = await fetch(window.location.pathname, { credentials: "same-origin", cache: "no-store" });
      if (!response.ok) {
        status.textContent = "refresh failed: HTTP " + response.status;
        return;
      }
      const doc = new DOMParser().parseFromString(await response.text(), "text/html");
      const fresh = doc.getElementById("main");
      if (fresh) {
        bust(fresh);
        document.getElementById("main").replaceWith(fresh);
      }
      status.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (err) {
      status.textContent = "refresh failed: " + err.message;
    }
  }

  window.setInterval(refresh, PERIOD_MS);
})();
