/* Admin > sites: GET /api/v1/sites every 10 s, shown as cards; POST /api/v1/sites
 * (add a network site: its token is shown once), PATCH /api/v1/sites/<name> (its
 * reach), POST and DELETE /api/v1/sites/<name>/token (rotate, revoke), DELETE
 * /api/v1/sites/<name>. */
"use strict";

(() => {
  const lg = window.labgate;
  const { h, api, say } = lg;
  const list = document.getElementById("sites");
  const loading = document.getElementById("sites-loading");
  const message = document.getElementById("sites-message");
  const form = document.getElementById("site-form");
  const formError = document.getElementById("site-error");
  const tokenBox = document.getElementById("site-token");
  const portalUrl = document.getElementById("new-site").dataset.portalUrl || location.origin;
  const KNOWN = new Set(["name", "backend", "instances", "labels", "capacity", "use", "used", "alive", "live",
    "last_seen_at", "inventory", "kind", "reach", "status", "connected_since", "disconnected_since",
    "last_heartbeat", "agent_version", "agent", "token_issued_at", "options", "data_root", "group_root"]);
  /* A site's status as an instance-state badge colour. */
  const BADGE = { local: "running", connected: "running", waiting: "pending", disconnected: "lost", revoked: "stopped" };
  const STATUS_TEXT = { local: "in process", connected: "connected", waiting: "waiting for its agent", disconnected: "disconnected", revoked: "token revoked" };

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

  /* Status badge, since when, last heartbeat and agent version. */
  function status(site) {
    const value = site.status || (site.live === false ? "disconnected" : "local");
    const since = value === "connected" ? site.connected_since : value === "disconnected" ? site.disconnected_since : null;
    const facts = [];
    if (site.last_heartbeat) facts.push([h("dt", {}, "Last heartbeat"), h("dd", {}, lg.time(site.last_heartbeat, lg.since(site.last_heartbeat)))]);
    if (site.agent_version) facts.push([h("dt", {}, "Agent"), h("dd", {}, site.agent_version, site.agent && site.agent.hostname ? ` on ${site.agent.hostname}` : "")]);
    if (site.token_issued_at) facts.push([h("dt", {}, "Token made"), h("dd", {}, lg.time(site.token_issued_at))]);
    if (site.data_root) facts.push([h("dt", {}, "Data root"), h("dd", {}, h("code", {}, site.data_root))]);
    if (site.group_root) {
      const held = site.agent && Array.isArray(site.agent.groups) ? site.agent.groups : null;
      facts.push([h("dt", {}, "Group volumes"), h("dd", {}, h("code", {}, site.group_root),
        held ? ` (${held.length ? held.join(", ") : "none yet"})` : "")]);
    }
    return [
      h("p", { class: "site-status" },
        h("span", { class: "state", dataset: { state: BADGE[value] || "lost" } }, STATUS_TEXT[value] || value),
        since ? h("span", { class: "hint" }, " since ", lg.time(since, lg.since(since))) : null),
      facts.length ? h("dl", { class: "facts compact" }, facts.flat()) : null,
    ];
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

  /* The token, once, and the command that starts the site's agent with it. */
  function showToken(site, what) {
    const command = `labgate agent --portal ${portalUrl} --token ${site.token}`;
    tokenBox.replaceChildren(
      h("h3", {}, `${what} ${site.name}`),
      h("p", {}, "Its enrolment token, shown only this once: ", h("code", { class: "copyable" }, site.token)),
      h("p", {}, "On the site's machine, run:"),
      h("pre", {}, h("code", { class: "copyable", id: "site-agent-command" }, command)),
    );
    tokenBox.hidden = false;
    tokenBox.focus();
  }

  async function act(site, button, busyText, work) {
    lg.busy(button, busyText);
    try {
      await work();
      await refresh();
    } catch (err) {
      lg.idle(button);
      say(message, `${site.name}: ${err.message}`, "error");
    }
  }

  function actions(site) {
    if (site.kind !== "network") return null;
    const path = `/sites/${encodeURIComponent(site.name)}`;
    const items = h("ul", { class: "actions compact" });
    const add = (text, label, handler, kind) => {
      const button = h("button", { type: "button", class: `small ${kind || ""}`, "aria-label": `${label} ${site.name}` }, text);
      button.addEventListener("click", () => handler(button));
      items.append(h("li", {}, button));
    };
    add(site.status === "revoked" ? "New token" : "Rotate token", "New token for", (b) => {
      if (site.status !== "revoked" && !confirm(`Give ${site.name} a new token? The old one stops working and its agent is cut off.`)) return;
      act(site, b, "…", async () => {
        showToken(await api("POST", `${path}/token`), "New token for");
        say(message, `${site.name} has a new token; start its agent with it.`);
      });
    });
    const other = site.reach === "tunnel" ? "direct" : "tunnel";
    add(other === "direct" ? "Reach directly" : "Reach through its agent", "Change the reach of", (b) => {
      const how = other === "direct"
        ? "the router will connect to its instances at the addresses the site reports"
        : "the router will reach its instances through its agent's connection";
      if (!confirm(`Change how ${site.name} is reached? From now on ${how}; its agent reconnects and its tools keep running.`)) return;
      act(site, b, "…", async () => {
        await api("PATCH", path, { reach: other });
        say(message, `${site.name} is reached ${other === "direct" ? "directly" : "through its agent"} now.`);
      });
    });
    if (site.status !== "revoked") {
      add("Revoke token", "Revoke the token of", (b) => {
        if (!confirm(`Revoke the token of ${site.name}? Its agent is cut off until it gets a new one.`)) return;
        act(site, b, "…", async () => {
          await api("DELETE", `${path}/token`);
          say(message, `The token of ${site.name} is revoked; its agent is cut off.`);
        });
      }, "danger");
    }
    add("Remove", "Remove site", (b) => {
      if (!confirm(`Remove site ${site.name} and cut off its agent?`)) return;
      act(site, b, "…", async () => {
        await api("DELETE", path);
        say(message, `Site ${site.name} is removed.`);
      });
    }, "danger");
    return items;
  }

  function card(site) {
    const labels = Object.entries(site.labels || {});
    const kind = site.kind === "network" ? `network site, reach ${site.reach}` : "from the settings";
    return h("li", { class: "card", dataset: { site: site.name, status: site.status || "" } },
      h("div", { class: "card-head" }, h("h2", {}, site.name)),
      h("p", { class: "meta" }, `${site.backend} backend · ${kind} · ${site.instances} active instance${site.instances === 1 ? "" : "s"}`),
      status(site),
      capacity(site),
      inventory(site),
      extras(site),
      labels.length ? h("ul", { class: "labels", "aria-label": "Labels" }, labels.map(([k, v]) => h("li", {}, h("code", {}, `${k}=${v}`)))) : null,
      actions(site),
    );
  }

  async function refresh() {
    const sites = await api("GET", "/sites");
    list.replaceChildren(...sites.map(card));
    loading.hidden = true;
  }

  /* "zone=lab gpu=a100" (spaces or commas between) as an object; null if malformed. */
  function parseLabels(text) {
    const labels = {};
    for (const pair of text.split(/[\s,]+/).filter(Boolean)) {
      const at = pair.indexOf("=");
      if (at < 1) return null;
      labels[pair.slice(0, at)] = pair.slice(at + 1);
    }
    return labels;
  }

  function problem(text, field) {
    say(formError, text);
    if (field) field.focus();
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const f = form.elements;
    const name = f.name.value.trim();
    if (!/^[a-z][a-z0-9-]{0,62}$/.test(name)) return problem("Site names are lower case, start with a letter, and use letters, digits or -.", f.name);
    const labels = parseLabels(f.labels.value);
    if (labels === null) return problem("Labels are key=value pairs, separated by spaces.", f.labels);
    let options = {};
    if (f.options.value.trim()) {
      try {
        options = JSON.parse(f.options.value);
      } catch {
        options = null;
      }
      if (!options || typeof options !== "object" || Array.isArray(options)) return problem('Backend options are a JSON object, e.g. {"pull": "never"}.', f.options);
    }
    const memory = f.memory.value.trim();
    if (memory && memory !== "0" && Number.isNaN(lg.parseSize(memory))) return problem("Memory is a size such as 64G.", f.memory);
    const body = {
      name,
      backend: f.backend.value,
      reach: f.reach.value,
      options,
      labels,
      capacity: {
        cpu: f.cpu.value ? Number(f.cpu.value) : 0,
        memory: memory || 0,
        max_instances: f.max_instances.value ? Math.trunc(Number(f.max_instances.value)) : 0,
      },
    };
    if (f.data_root.value.trim()) body.data_root = f.data_root.value.trim();
    if (f.group_root.value.trim()) body.group_root = f.group_root.value.trim();
    say(formError, "");
    const button = form.querySelector("button[type=submit]");
    lg.busy(button, "Adding…");
    try {
      const site = await api("POST", "/sites", body);
      showToken(site, "Added");
      form.reset();
      await refresh();
    } catch (err) {
      say(formError, err.message);
    } finally {
      lg.idle(button);
    }
  });

  lg.poll(async () => {
    try {
      await refresh();
      if (!list.children.length) say(message, "No sites are configured.");
      else if (message.dataset.listing) say(message, "");
      delete message.dataset.listing;
    } catch (err) {
      message.dataset.listing = "failed";
      say(message, `Could not list sites: ${err.message}`, "error");
    }
  }, () => 10000);
})();
