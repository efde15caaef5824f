/* Admin > sites: GET /api/v1/sites every 10 s, shown as cards. Fields the API
 * adds later (capacity, use, liveness) show up without changes here. */
"use strict";

(() => {
  const lg = window.labgate;
  const { h, api, say } = lg;
  const list = document.getElementById("sites");
  const loading = document.getElementById("sites-loading");
  const message = document.getElementById("sites-message");
  const KNOWN = new Set(["name", "backend", "instances", "labels", "capacity", "use", "used", "alive", "live", "last_seen_at", "inventory"]);

  function amount(key, value) {
    if (key === "memory") return lg.size(value);
    return key === "cpu" ? `${+Number(value).toFixed(2)}` : String(value);
  }

  /* "1.5 of 8" with a meter, or "2 in use, no limit" when the capacity is 0. */
  function capacity(site) {
    const cap = site.capacity;
    if (!cap || typeof cap !== "object") return null;
    const used = site.use || site.used || {};
    const rows = Object.entries(cap).map(([key, limit]) => {
      const label = { cpu: "CPU", memory: "Memory", max_instances: "Instances" }[key] || key;
      const inUse = used[key] ?? (key === "max_instances" ? used.instances ?? site.instances : undefined);
      let text;
      if (!limit) text = inUse !== undefined ? `${amount(key, inUse)} in use, no limit` : "no limit";
      else text = inUse !== undefined ? `${amount(key, inUse)} of ${amount(key, limit)}` : amount(key, limit);
      const meter = inUse !== undefined && limit
        ? h("meter", { min: "0", max: String(limit), value: String(inUse), "aria-label": `${label} in use` })
        : null;
      return [h("dt", {}, label), h("dd", {}, text, meter)];
    });
    return h("dl", { class: "facts compact" }, rows.flat());
  }

  function liveness(site) {
    const alive = site.alive ?? site.live;
    if (alive === undefined && !site.last_seen_at) return null;
    const state = alive === false ? "lost" : "running";
    return h("p", {}, h("span", { class: "state", dataset: { state } }, alive === false ? "unreachable" : "online"),
      site.last_seen_at ? h("span", { class: "hint" }, " last seen ", lg.time(site.last_seen_at, lg.since(site.last_seen_at))) : null);
  }

  function inventory(site) {
    const report = site.inventory;
    if (!report) return null;
    const replicas = Array.isArray(report.replicas) ? report.replicas.length : report.replicas;
    return h("p", { class: "meta" },
      `Inventory: ${replicas ?? 0} replica${replicas === 1 ? "" : "s"}`,
      report.reported_at ? `, reported ${lg.since(report.reported_at)}` : "",
      report.stale ? h("span", { class: "state", dataset: { state: "lost" } }, "stale") : null);
  }

  function extras(site) {
    const rows = Object.entries(site)
      .filter(([key, value]) => !KNOWN.has(key) && value !== null && typeof value !== "object")
      .map(([key, value]) => [h("dt", {}, key.replace(/_/g, " ")), h("dd", {}, String(value))]);
    return rows.length ? h("dl", { class: "facts compact" }, rows.flat()) : null;
  }

  function card(site) {
    const labels = Object.entries(site.labels || {});
    return h("li", { class: "card", dataset: { site: site.name } },
      h("div", { class: "card-head" }, h("h2", {}, site.name)),
      h("p", { class: "meta" }, `${site.backend} backend · ${site.instances} active instance${site.instances === 1 ? "" : "s"}`),
      liveness(site),
      capacity(site),
      inventory(site),
      extras(site),
      labels.length ? h("ul", { class: "labels", "aria-label": "Labels" }, labels.map(([k, v]) => h("li", {}, h("code", {}, `${k}=${v}`)))) : null,
    );
  }

  lg.poll(async () => {
    try {
      const sites = await api("GET", "/sites");
      list.replaceChildren(...sites.map(card));
      loading.hidden = true;
      say(message, sites.length ? "" : "No sites are configured.");
    } catch (err) {
      say(message, `Could not list sites: ${err.message}`, "error");
    }
  }, () => 10000);
})();
