// emo-serve /ui: refresh the server-rendered page in place every few seconds (no framework,
// no build step). Heatmaps are not fetched anew on every refresh: each image already shown is
// kept and asked for with its ETag (a bodiless 304 when its picture is unchanged, which costs the
// server a hash rather than a drawing), and replaced only when the picture changed.
"use strict";
(function () {
  const PERIOD_MS = 10000;
  const status = document.getElementById("refresh-status");

  // Images shown now, by their URL: a refreshed page takes these over instead of loading its own.
  function shownImages() {
    const shown = new Map();
    for (const img of document.querySelectorAll("#main img[data-src]")) {
      if (img.complete && img.naturalWidth > 0) shown.set(img.dataset.src, img);
    }
    return shown;
  }

  // Before the fresh (still inert) page is adopted, point its images at what is shown already:
  // the same URL, or the blob of a picture fetched on an earlier refresh. The blobs of images
  // the fresh page no longer has (a deleted subset) are freed.
  function carryOver(fresh, shown) {
    const kept = new Set();
    for (const img of fresh.querySelectorAll("img[data-src]")) {
      const old = shown.get(img.dataset.src);
      if (old) {
        img.src = old.src;
        img.dataset.etag = old.dataset.etag || "";
        kept.add(img.dataset.src);
      }
    }
    for (const [src, old] of shown) {
      if (!kept.has(src) && old.src.startsWith("blob:")) URL.revokeObjectURL(old.src);
    }
  }

  // Fetch a picture again only if it changed. The ETag is sent by hand, with the HTTP cache
  // bypassed, so the 304 reaches this script whatever the browser caches (a browser may not
  // cache what it fetched with credentials); the first refresh, knowing no ETag, fetches once.
  async function revalidate(img) {
    const headers = img.dataset.etag ? { "If-None-Match": img.dataset.etag } : {};
    const response = await fetch(img.dataset.src, { credentials: "same-origin", cache: "no-store", headers });
    if (response.status === 304 || !response.ok) return;
    const url = URL.createObjectURL(await response.blob());
    const previous = img.src;
    img.dataset.etag = response.headers.get("ETag") || "";
    img.src = url;
    if (previous.startsWith("blob:")) URL.revokeObjectURL(previous);
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
        const shown = shownImages();
        carryOver(fresh, shown);
        document.getElementById("main").replaceWith(fresh);
        await Promise.all([...fresh.querySelectorAll("img[data-src]")]
          .filter((img) => shown.has(img.dataset.src))
          .map((img) => revalidate(img).catch(() => undefined)));
      }
      status.textContent = "updated " + new Date().toLocaleTimeString();
    } catch (err) {
      status.textContent = "refresh failed: " + err.message;
    }
  }

  window.setInterval(refresh, PERIOD_MS);
})();
