/* My instances and Admin > instances: a table kept live by polling
 * GET /api/v1/instances (every 2 s while something is changing, 10 s otherwise);
 * Stop is DELETE /api/v1/instances/<id>. Rows are updated in place so keyboard
 * focus stays where it was. */
"use strict";

(() => {
  const lg = window.labgate;
  const { h, api, say } = lg;
  const table = document.getElementById("instances");
  if (!table) return;
  const admin = table.dataset.admin === "true";
  const me = document.body.dataset.user;
  // Another user's instance opens in the browser only on its own host (instance_host),
  // or where the operator let it open on the portal's origin; the router refuses it otherwise.
  const othersOpen = document.body.dataset.othersOpen === "true";
  const tbody = table.tBodies[0];
  const empty = document.getElementById("instances-empty");
  const loading = document.getElementById("instances-loading");
  const message = document.getElementById("list-message");
  const updated = document.getElementById("updated");
  const onlyActive = document.getElementById("only-active");
  const filters = document.getElementById("filters");
  const rows = new Map();
  const stopping = new Map();
  let changing = false;

  function query() {
    const params = new URLSearchParams({ limit: "100" });
    // Without a user filter, a user's list holds their instances and those shared with them.
    if (onlyActive?.checked) params.set("active", "true");
    if (filters) {
      const data = new FormData(filters);
      const user = data.get("user").trim().toLowerCase();
      if (user) params.set("user", user);
      if (data.get("tool")) params.set("tool", data.get("tool"));
      const state = data.get("state");
      if (state === "active") params.set("active", "true");
      else if (state) params.set("state", state);
    }
    return `/instances?${params}`;
  }

  async function stop(instance, button) {
    if (admin && instance.owner !== me && !confirm(`Stop ${instance.owner}'s ${instance.tool} (${instance.id})?`)) return;
    lg.busy(button, "Stopping…");
    try {
      const answer = await api("DELETE", `/instances/${encodeURIComponent(instance.id)}`);
      stopping.set(instance.id, instance.tool);
      say(message, `Stopping ${instance.tool} (${instance.id})…`);
      update(answer);
      setTimeout(refresher.now, 500);
    } catch (err) {
      say(message, `Could not stop ${instance.id}: ${err.message}`, "error");
    } finally {
      lg.idle(button);
    }
  }

  /* What the router saw: open connections now, else the last request. */
  function activity(instance) {
    const seen = instance.activity || {};
    const last = seen.last_request || instance.last_activity;
    const open = seen.open_websockets || 0;
    if (open > 0) {
      return [h("span", { class: "in-use", title: `${open} open connection${open === 1 ? "" : "s"}` }, "in use now")];
    }
    return [last ? lg.time(last, lg.since(last)) : "—"];
  }

  function build(instance) {
    const cells = {
      tool: h("td", { "data-label": "Tool" }),
      state: h("td", { "data-label": "State" }),
      site: h("td", { "data-label": "Site" }),
      age: h("td", { "data-label": "Age" }),
      activity: h("td", { "data-label": "Last activity" }),
      resources: h("td", { "data-label": "Resources" }),
      actions: h("td", { class: "actions-cell" }),
    };
    const open = h("a", { class: "button primary small", href: instance.url }, "Open");
    const stopButton = h("button", { type: "button", class: "danger small" }, "Stop");
    stopButton.addEventListener("click", () => stop(rows.get(instance.id).instance, stopButton));
    const logs = h("a", { class: "button small", href: `/instances/${encodeURIComponent(instance.id)}/logs` }, "Logs");
    cells.actions.append(h("ul", { class: "actions compact" }, h("li", {}, open), h("li", {}, stopButton), h("li", {}, logs)));
    const label = `${instance.tool} ${instance.id}`;
    for (const node of [open, stopButton, logs]) node.setAttribute("aria-label", `${node.textContent} ${label}`);
    const owner = admin ? h("td", { "data-label": "User" }, instance.owner) : null;
    const tr = h("tr", { dataset: { id: instance.id } },
      cells.tool, owner, cells.state, cells.site, cells.age, cells.activity, cells.resources, cells.actions);
    cells.tool.append(
      h("a", { href: `/instances/${encodeURIComponent(instance.id)}` }, instance.tool),
      h("span", { class: "id" }, instance.id),
    );
    if (instance.dataset) cells.tool.append(h("span", { class: "dataset" }, "with ", h("code", {}, instance.dataset)));
    if (instance.access === "use" || instance.access === "view") {
      cells.tool.append(h("span", { class: "shared-by" }, `shared by ${instance.owner} (${instance.access})`));
    } else if (instance.shared) {
      cells.tool.append(h("span", { class: "badge shared" }, "shared"));
    }
    return { tr, cells, open, stop: stopButton, instance };
  }

  function update(instance) {
    let row = rows.get(instance.id);
    if (!row) {
      row = build(instance);
      rows.set(instance.id, row);
    }
    row.instance = instance;
    const { cells } = row;
    if (cells.state.dataset.state !== instance.state) {
      cells.state.dataset.state = instance.state;
      cells.state.replaceChildren(lg.stateBadge(instance.state));
      if (instance.reason && (instance.state === "failed" || instance.state === "lost")) {
        cells.state.append(h("span", { class: "reason" }, lg.sentence(instance.reason)));
      }
    }
    row.tr.dataset.state = instance.state;
    cells.site.textContent = instance.site || "—";
    cells.age.replaceChildren(lg.time(instance.created_at, lg.ago(instance.created_at)));
    cells.activity.replaceChildren(...activity(instance));
    cells.resources.textContent = lg.resources(instance.resources);
    const shared = instance.access === "use" || instance.access === "view";
    row.open.hidden = instance.state !== "running" || instance.access === "view"
      || (instance.owner !== me && !othersOpen);
    row.stop.hidden = shared || !lg.ACTIVE.has(instance.state) || instance.state === "stopping";
    if (stopping.has(instance.id) && !lg.ACTIVE.has(instance.state)) {
      say(message, `${stopping.get(instance.id)} (${instance.id}) is ${instance.state}.`);
      stopping.delete(instance.id);
    }
    return row;
  }

  async function refresh() {
    const list = await api("GET", query());
    const seen = new Set();
    let previous = null;
    for (const instance of list) {
      const row = update(instance);
      seen.add(instance.id);
      const expected = previous ? previous.nextSibling : tbody.firstChild;
      if (expected !== row.tr) {
        if (previous) previous.after(row.tr);
        else tbody.prepend(row.tr);
      }
      previous = row.tr;
    }
    for (const [id, row] of rows) {
      if (!seen.has(id)) {
        row.tr.remove();
        rows.delete(id);
      }
    }
    changing = list.some((instance) => lg.TRANSITIONAL.has(instance.state)) || stopping.size > 0;
    loading.hidden = true;
    empty.hidden = list.length > 0;
    table.hidden = list.length === 0;
    if (updated) updated.textContent = `Updated ${new Date().toLocaleTimeString()}`;
  }

  const refresher = lg.poll(refresh, () => (changing ? 2000 : 10000));
  onlyActive?.addEventListener("change", refresher.now);
  filters?.addEventListener("submit", (event) => {
    event.preventDefault();
    refresher.now();
  });
  filters?.addEventListener("change", refresher.now);
})();
