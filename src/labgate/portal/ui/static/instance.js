/* Launch progress: follow GET /api/v1/instances/<id>/events (Server-Sent Events)
 * through scheduled → starting → health check → ready, then open the tool through
 * the router. A failure shows the reason and the last log lines, with a retry.
 * The tool opens by itself only when this page saw it become ready, and only
 * for its owner. While it runs, keep-alive.js shows when it would be stopped
 * for being idle and lets the user keep it alive. */
"use strict";

(() => {
  const lg = window.labgate;
  const { h, api, say } = lg;
  const root = document.getElementById("instance");
  if (!root) return;
  const id = root.dataset.id;
  const url = root.dataset.url;
  const initial = root.dataset.state;
  // Only the owner is taken into the tool; an admin looking on stays here.
  const mine = root.dataset.owner === document.body.dataset.user;
  const autoOpen = mine && ["queued", "pending", "starting"].includes(initial);
  const $ = (selector) => document.getElementById(selector);
  const status = $("status");
  const STEPS = ["scheduled", "starting", "health", "ready"];
  let state = initial;
  let source = null;
  let fallback = null;
  let opened = false;
  const keep = lg.keepAlive(id);

  function step(name, value) {
    const node = root.querySelector(`[data-step="${name}"]`);
    node.dataset.status = value;
    node.querySelector(".step-status").textContent = { done: ": done", active: ": in progress", failed: ": failed" }[value] || "";
    if (value === "active") node.setAttribute("aria-current", "step");
    else node.removeAttribute("aria-current");
  }

  function upTo(name, value) {
    for (const other of STEPS) {
      if (other === name) {
        step(other, value);
        return;
      }
      step(other, "done");
    }
  }

  function setState(next) {
    state = next;
    // A launch can be called off while it waits or starts: a queued one leaves the queue at once.
    const cancelRow = $("cancel-row");
    if (cancelRow) cancelRow.hidden = !["queued", "pending", "starting"].includes(next);
    const badge = $("state");
    badge.textContent = next;
    badge.dataset.state = next;
    root.dataset.state = next;
  }

  function showFailure(message, logTail) {
    $("reason").textContent = lg.sentence(message) || "The tool did not start.";
    $("log-tail").textContent = logTail && logTail.trim() ? logTail : "(the tool printed nothing)";
    $("failure").hidden = false;
    $("ready").hidden = true;
    const active = root.querySelector('[data-status="active"]')?.dataset.step || "starting";
    step(active, "failed");
    $("failure-heading").focus();
  }

  function addEvent(event) {
    const text = event.message ? `${event.state}: ${event.message}` : event.state;
    $("events").append(h("li", {}, lg.time(event.created_at, new Date(event.created_at).toLocaleTimeString()), " ", text));
  }

  /* A place in the start queue, e.g. "Number 3 in the start queue; starting in about 40 s…". */
  function queueText(place) {
    const wait = place.estimate >= 90 ? `${Math.round(place.estimate / 60)} min` : `${place.estimate} s`;
    return `Number ${place.position} in the start queue of site ${place.site}; starting in about ${wait}…`;
  }

  function apply(event) {
    addEvent(event);
    if (event.kind === "progress") {
      if (event.data && event.data.warning) keep.refresh();
      if (event.data && event.data.queue) {
        say(status, queueText(event.data.queue));
        return;
      }
      if (/health/i.test(event.message)) upTo("health", "active");
      say(status, `${event.message[0].toUpperCase()}${event.message.slice(1)}…`);
      return;
    }
    setState(event.state);
    switch (event.state) {
      case "queued":
        upTo("scheduled", "active");
        say(status, "Waiting in the site's start queue: other launches start first…");
        break;
      case "pending":
        upTo("starting", "active");
        say(status, event.message ? `Scheduled: ${event.message}.` : "Scheduled.");
        break;
      case "starting":
        upTo("starting", "active");
        say(status, `${event.message || "Starting"}…`);
        break;
      case "running":
        for (const name of STEPS) step(name, "done");
        $("ready").hidden = false;
        keep.start();
        if (autoOpen && !opened) {
          opened = true;
          say(status, "Ready. Opening the tool…");
          setTimeout(() => location.assign(url), 400);
        } else {
          say(status, "Ready.");
        }
        break;
      case "unreachable":
        keep.stop();
        say(status, event.message || "The site is not connected; waiting for it to come back…");
        break;
      case "failed":
        say(status, "The launch failed.");
        showFailure(event.message, event.data && event.data.log_tail);
        break;
      default:
        ended(event.state, event.message);
    }
    if (event.state !== "running") keep.stop();
    if (["failed", "stopped", "lost"].includes(event.state)) close();
  }

  function ended(final, message) {
    $("ready").hidden = true;
    if (!$("failure").hidden) return;
    $("ended").hidden = false;
    const text = {
      stopping: "The instance is stopping.",
      stopped: "This instance was stopped.",
      lost: message ? `This instance was lost: ${lg.sentence(message)}` : "This instance was lost.",
    }[final];
    $("ended-text").textContent = text || `This instance is ${final}.`;
    say(status, text || final);
    $("relaunch").hidden = final === "stopping";
  }

  function close() {
    source?.close();
    fallback?.stop();
  }

  /* When the stream cannot be opened (the session ended, a proxy refused it),
   * poll the instance instead: labgate.api() sends an ended session to sign in. */
  function pollInstead() {
    if (fallback) return;
    let lastState = null;
    fallback = lg.poll(async () => {
      const instance = await api("GET", `/instances/${encodeURIComponent(id)}`);
      if (instance.state === lastState) return;
      lastState = instance.state;
      apply({ kind: "state", state: instance.state, message: instance.reason, data: {}, created_at: new Date().toISOString() });
    }, () => 2000);
  }

  function follow() {
    source = new EventSource(`/api/v1/instances/${encodeURIComponent(id)}/events`);
    for (const kind of ["state", "progress"]) {
      source.addEventListener(kind, (message) => apply(JSON.parse(message.data)));
    }
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED && !["failed", "stopped", "lost"].includes(state)) pollInstead();
    });
  }

  async function launchAgain(button) {
    const error = $("retry-error");
    lg.busy(button, "Launching…");
    try {
      const old = await api("GET", `/instances/${encodeURIComponent(id)}`);
      const body = { tool: old.tool, resources: { cpu: old.resources.cpu, memory: old.resources.memory } };
      const instance = await api("POST", "/instances", body);
      location.assign(`/instances/${encodeURIComponent(instance.id)}`);
    } catch (err) {
      lg.idle(button);
      say(error, err.message);
      if (error.hidden) say(status, err.message);
    }
  }

  $("retry").addEventListener("click", (event) => launchAgain(event.currentTarget));
  $("relaunch").addEventListener("click", (event) => launchAgain(event.currentTarget));
  $("cancel")?.addEventListener("click", async (event) => {
    const button = event.currentTarget;
    lg.busy(button, "Cancelling…");
    try {
      const instance = await api("DELETE", `/instances/${encodeURIComponent(id)}`);
      setState(instance.state);
      ended(instance.state);
    } catch (err) {
      say(status, `Could not cancel: ${err.message}`);
    } finally {
      lg.idle(button);
    }
  });

  $("stop")?.addEventListener("click", async (event) => {
    const button = event.currentTarget;
    lg.busy(button, "Stopping…");
    try {
      const instance = await api("DELETE", `/instances/${encodeURIComponent(id)}`);
      setState(instance.state);
      keep.stop();
      ended(instance.state);
    } catch (err) {
      say(status, `Could not stop: ${err.message}`);
    } finally {
      lg.idle(button);
    }
  });
  follow();
})();
