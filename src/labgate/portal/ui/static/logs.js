/* Logs: a live tail of GET /api/v1/instances/<id>/logs, refreshed every 2 s
 * while the instance is active. */
"use strict";

(() => {
  const lg = window.labgate;
  const root = document.getElementById("logs-page");
  if (!root) return;
  const id = encodeURIComponent(root.dataset.id);
  const log = document.getElementById("log");
  const follow = document.getElementById("follow");
  const lines = document.getElementById("lines");
  const badge = document.getElementById("state");
  const error = document.getElementById("log-error");
  const updated = document.getElementById("updated");
  let state = root.dataset.state;

  async function refresh() {
    try {
      const [instance, logs] = await Promise.all([
        lg.api("GET", `/instances/${id}`),
        lg.api("GET", `/instances/${id}/logs?lines=${lines.value}`),
      ]);
      state = instance.state;
      badge.textContent = state;
      badge.dataset.state = state;
      const text = logs.text || "(no output yet)";
      if (log.textContent !== text) {
        log.textContent = text;
        if (follow.checked) log.scrollTop = log.scrollHeight;
      }
      lg.say(error, "");
      updated.textContent = lg.ACTIVE.has(state)
        ? `Updated ${new Date().toLocaleTimeString()}`
        : `The instance is ${state}; this is its last output.`;
      if (!lg.ACTIVE.has(state)) poller.stop();
    } catch (err) {
      lg.say(error, `Could not read the logs: ${err.message}`);
    }
  }

  const poller = lg.poll(refresh, () => 2000);
  lines.addEventListener("change", refresh);
  follow.addEventListener("change", () => {
    if (follow.checked) log.scrollTop = log.scrollHeight;
  });
})();
