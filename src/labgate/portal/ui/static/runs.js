/* A run's page: the graph of stages and tasks kept live by polling
 * GET /api/v1/runs/<id> (every second while the run is not finished);
 * Cancel and Re-run are POSTs to the API; Logs fetches a task's output. */
"use strict";

(() => {
  const lg = window.labgate;
  const { h, api, say } = lg;
  const graph = document.getElementById("run-graph");
  if (!graph) return;
  const id = graph.dataset.run;
  const message = document.getElementById("run-message");
  const cancel = document.getElementById("run-cancel");
  const rerun = document.getElementById("run-rerun");
  const logs = document.getElementById("task-log");
  const FINISHED = ["succeeded", "failed", "cancelled"];

  function badge(state) {
    return h("span", { class: "state", "data-state": state }, state);
  }

  function taskItem(task) {
    const meta = [];
    if (task.site) meta.push(`on ${task.site}`);
    if (task.exit_code !== null) meta.push(`exit ${task.exit_code}`);
    if (task.seconds !== null) meta.push(`${task.seconds.toFixed(1)}s`);
    if (task.attempts > 1) meta.push(`${task.attempts} attempts`);
    const parts = [h("strong", {}, task.name), " ", badge(task.state), " ",
      h("span", { class: "meta" }, meta.join(" · "))];
    if (task.reason) parts.push(" ", h("span", { class: "hint" }, task.reason));
    if (task.result !== null) parts.push(" ", h("code", { class: "result" }, JSON.stringify(task.result)));
    parts.push(" ", h("button", { type: "button", class: "link task-logs", "data-task": task.name }, "Logs"));
    return h("li", { class: "run-task", "data-task": task.name, "data-state": task.state }, ...parts);
  }

  function draw(run) {
    const state = document.getElementById("run-state");
    state.textContent = run.state;
    state.dataset.state = run.state;
    document.getElementById("run-reason").textContent = run.reason;
    cancel.hidden = FINISHED.includes(run.state);
    rerun.hidden = !["failed", "cancelled"].includes(run.state);
    graph.replaceChildren(...run.stages.map((stage) => h("li", { class: "run-stage", "data-state": stage.state },
      h("h2", {}, stage.name, " ", badge(stage.state)),
      h("ul", { class: "run-tasks" }, ...stage.tasks.map(taskItem)))));
  }

  async function refresh() {
    try {
      const run = await api("GET", `/runs/${encodeURIComponent(id)}?events=false`);
      draw(run);
      document.getElementById("updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
      if (!FINISHED.includes(run.state)) setTimeout(refresh, 1000);
    } catch (err) {
      say(message, err.detail || String(err), "error");
      setTimeout(refresh, 5000);
    }
  }

  async function act(button, path, doing) {
    lg.busy(button, doing);
    try {
      draw(await api("POST", `/runs/${encodeURIComponent(id)}/${path}`));
      setTimeout(refresh, 500);
    } catch (err) {
      say(message, err.detail || String(err), "error");
    } finally {
      lg.idle(button);
    }
  }

  cancel.addEventListener("click", () => act(cancel, "cancel", "Cancelling…"));
  rerun.addEventListener("click", () => act(rerun, "rerun", "Starting…"));
  graph.addEventListener("click", async (event) => {
    const button = event.target.closest(".task-logs");
    if (!button) return;
    const task = button.dataset.task;
    try {
      const answer = await api("GET", `/runs/${encodeURIComponent(id)}/logs?task=${encodeURIComponent(task)}`);
      document.getElementById("logs-section").hidden = false;
      document.getElementById("logs-title").textContent = `Logs of ${task}`;
      logs.textContent = answer.text || "(no output)";
    } catch (err) {
      say(message, err.detail || String(err), "error");
    }
  });
  refresh();
})();
