/* API tokens: POST /api/v1/tokens (the token is shown once), GET to list,
 * DELETE /api/v1/tokens/<id> to revoke. */
"use strict";

(() => {
  const lg = window.labgate;
  const { h, api, say } = lg;
  const form = document.getElementById("token-form");
  const tbody = document.querySelector("#tokens tbody");
  const empty = document.getElementById("tokens-empty");
  const message = document.getElementById("tokens-message");
  const error = document.getElementById("token-error");
  const panel = document.getElementById("new-token");
  const value = document.getElementById("new-token-value");
  const copyStatus = document.getElementById("copy-status");

  function expiry(token) {
    if (!token.expires_at) return "never";
    const expired = Date.parse(token.expires_at) <= Date.now();
    return h("span", { class: expired ? "expired" : "" }, lg.time(token.expires_at), expired ? " (expired)" : "");
  }

  async function revoke(token, button) {
    const name = token.note ? `“${token.note}” (${token.prefix}…)` : `${token.prefix}…`;
    if (!confirm(`Revoke token ${name}? Scripts using it stop working.`)) return;
    lg.busy(button, "Revoking…");
    try {
      await api("DELETE", `/tokens/${token.id}`);
      say(message, `Token ${name} revoked.`);
      await load();
    } catch (err) {
      lg.idle(button);
      say(message, `Could not revoke: ${err.message}`, "error");
    }
  }

  async function load() {
    const tokens = await api("GET", "/tokens");
    tbody.replaceChildren(
      ...tokens.map((token) => {
        const button = h("button", { type: "button", class: "danger small", "aria-label": `Revoke ${token.prefix}` }, "Revoke");
        button.addEventListener("click", () => revoke(token, button));
        return h("tr", { dataset: { id: token.id } },
          h("td", { "data-label": "Token" }, h("code", {}, `${token.prefix}…`)),
          h("td", { "data-label": "Note" }, token.note || "—"),
          h("td", { "data-label": "Scopes" }, h("ul", { class: "scopes" }, token.scopes.map((s) => h("li", {}, h("code", {}, s))))),
          h("td", { "data-label": "Created" }, lg.time(token.created_at)),
          h("td", { "data-label": "Expires" }, expiry(token)),
          h("td", { "data-label": "Last used" }, token.last_used_at ? lg.time(token.last_used_at) : "never"),
          h("td", { class: "actions-cell" }, button),
        );
      }),
    );
    empty.hidden = tokens.length > 0;
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const scopes = data.getAll("scopes");
    if (!scopes.length) {
      say(error, "Choose at least one scope.");
      form.querySelector('input[name="scopes"]').focus();
      return;
    }
    say(error, "");
    const body = { note: data.get("note").trim(), scopes };
    if (data.get("expires_in")) body.expires_in = Number(data.get("expires_in"));
    const button = form.querySelector("button[type=submit]");
    lg.busy(button, "Creating…");
    try {
      const created = await api("POST", "/tokens", body);
      value.value = created.token;
      say(copyStatus, "");
      panel.hidden = false;
      value.focus();
      value.select();
      form.reset();
      await load();
    } catch (err) {
      say(error, err.message);
    } finally {
      lg.idle(button);
    }
  });

  document.getElementById("copy-token").addEventListener("click", async () => {
    value.select();
    try {
      await navigator.clipboard.writeText(value.value);
      say(copyStatus, "Copied.");
    } catch {
      say(copyStatus, "Select the token and copy it (Ctrl+C or ⌘C).");
    }
  });

  load().catch((err) => say(message, `Could not list tokens: ${err.message}`, "error"));
})();
