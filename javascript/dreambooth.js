// Dreambooth tab: live progress while a training runs.
//
// The server renders the status block (#dreambooth_status) with data-db-running / data-db-progress /
// data-db-tick. While a run is active this script clicks the tab's Refresh button (#dreambooth_poll) about once a
// second, one request at a time (the next click waits until the previous answer changed data-db-tick), which
// refreshes the progress bar, loss chart, gallery and log; and it puts the percentage in the page title.
// The worker-log box (#dreambooth_log) follows its newest line: when new lines come it is scrolled to the bottom,
// unless the user has scrolled up to read (gradio 3's textbox shows its top). It starts from the WebUI's onUiLoaded
// when that exists, and on its own in the standalone app. (The model and checkpoint lists are read again at each
// page load by the tab's own load events, not from here: a click before gradio takes events is lost.)
(function () {
  "use strict";

  var POLL_MS = 1000; // one refresh a second while running
  var STALE_MS = 15000; // click again if an answer never came
  var lastClick = 0;
  var clickedTick = null;
  var baseTitle = null;
  var started = false;

  function root() {
    if (typeof gradioApp === "function") {
      return gradioApp();
    }
    var app = document.querySelector("gradio-app");
    if (app && app.shadowRoot) {
      return app.shadowRoot;
    }
    return document;
  }

  function statusBlock() {
    return root().querySelector("#dreambooth_status [data-db-running]");
  }

  function refreshButton() {
    var el = root().querySelector("#dreambooth_poll");
    if (el && el.tagName !== "BUTTON") {
      el = el.querySelector("button") || el;
    }
    return el;
  }

  function setTitle(running, percent) {
    if (baseTitle === null) {
      baseTitle = document.title.replace(/^\[\d+%\] /, "");
    }
    var title = running ? "[" + Math.floor(percent) + "%] " + baseTitle : baseTitle;
    if (document.title !== title) {
      document.title = title;
    }
  }

  function atBottom(box) {
    return box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
  }

  function followLog() {
    var box = root().querySelector("#dreambooth_log textarea");
    if (!box) {
      return;
    }
    if (!box.dataset.dbFollow) {
      box.dataset.dbFollow = "1";
      box.addEventListener("scroll", function () {
        box.dataset.dbFollow = atBottom(box) ? "1" : "0"; // scrolled up to read: stay there
      });
    }
    if (box.value !== box.dataset.dbSeen) {
      box.dataset.dbSeen = box.value;
      if (box.dataset.dbFollow === "1") {
        box.scrollTop = box.scrollHeight;
      }
    }
  }

  function tick() {
    followLog();
    var block = statusBlock();
    if (!block) {
      return;
    }
    var running = block.getAttribute("data-db-running") === "1";
    var percent = parseFloat(block.getAttribute("data-db-progress") || "0") || 0;
    setTitle(running, percent);
    if (!running) {
      clickedTick = null;
      return;
    }
    var now = Date.now();
    var currentTick = block.getAttribute("data-db-tick");
    var answered = currentTick !== clickedTick;
    if ((answered && now - lastClick >= POLL_MS) || now - lastClick >= STALE_MS) {
      var button = refreshButton();
      if (button) {
        clickedTick = currentTick;
        lastClick = now;
        button.click();
      }
    }
  }

  function start() {
    if (started) {
      return;
    }
    started = true;
    setInterval(tick, 250);
  }

  if (typeof onUiLoaded === "function") {
    onUiLoaded(start); // inside the WebUI
  } else if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
