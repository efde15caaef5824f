/* Admin > users: GET/POST /api/v1/users, PATCH /api/v1/users/<name> (disable,
 * enable, admin flag), PUT /api/v1/users/<name>/password (reset). */
"use strict";

(() => {
  const lg = window.labgate;
  const { h, api, say } = lg;
  const me = document.body.dataset.user;
  const tbody = document.querySelector("#users tbody");
  const message = document.getElementById("users-message");
  const form = document.getElementById("user-form");
  const formError = document.getElementById("user-error");
  const created = document.getElementById("user-created");
  const dialog = document.getElementById("reset-dialog");
  const resetForm = document.getElementById("reset-form");
  const resetError = document.getElementById("reset-error");
  let resetting = null;

  async function change(user, patch, button, done) {
    lg.busy(button, "…");
    try {
      await api("PATCH", `/users/${encodeURIComponent(user.name)}`, patch);
      say(message, done);
      await load();
    } catch (err) {
      lg.idle(button);
      say(message, `${user.name}: ${err.message}`, "error");
    }
  }

  function actions(user) {
    const list = h("ul", { class: "actions compact" });
    const add = (text, label, handler, kind) => {
      const button = h("button", { type: "button", class: `small ${kind || ""}`, "aria-label": `${label} ${user.name}` }, text);
      button.addEventListener("click", () => handler(button));
      list.append(h("li", {}, button));
    };
    if (user.disabled) {
      add("Enable", "Enable", (b) => change(user, { disabled: false }, b, `${user.name} can sign in again.`));
    } else {
      add("Disable", "Disable", (b) => {
        const self = user.name === me ? " You will be signed out." : "";
        if (confirm(`Disable ${user.name}? Their sessions and tokens stop working at once.${self}`)) {
          change(user, { disabled: true }, b, `${user.name} is disabled and signed out.`);
        }
      }, "danger");
    }
    if (user.is_admin) {
      add("Remove admin", "Remove admin from", (b) => change(user, { is_admin: false }, b, `${user.name} is no longer an admin.`));
    } else {
      add("Make admin", "Make admin", (b) => change(user, { is_admin: true }, b, `${user.name} is now an admin.`));
    }
    if (user.data_provider) {
      add("Revoke data provider", "Revoke the data-provider role of", (b) => change(user, { data_provider: false }, b, `${user.name} may no longer register datasets.`));
    } else {
      add("Make data provider", "Make data provider", (b) => change(user, { data_provider: true }, b, `${user.name} may now register datasets.`));
    }
    add("Reset password", "Reset password of", () => openReset(user));
    return list;
  }

  async function load() {
    const users = await api("GET", "/users");
    tbody.replaceChildren(
      ...users.map((user) =>
        h("tr", { dataset: { name: user.name, disabled: String(user.disabled) } },
          h("td", { "data-label": "Name" }, user.name, user.name === me ? h("span", { class: "hint" }, " (you)") : null),
          h("td", { "data-label": "Role" }, user.is_admin ? "admin" : user.data_provider ? "data provider" : "user"),
          h("td", { "data-label": "Status" }, h("span", { class: "state", dataset: { state: user.disabled ? "failed" : "running" } }, user.disabled ? "disabled" : "active")),
          h("td", { "data-label": "Created" }, lg.time(user.created_at)),
          h("td", { "data-label": "Last sign-in" }, user.last_login_at ? lg.time(user.last_login_at) : "never"),
          h("td", { class: "actions-cell" }, actions(user)),
        ),
      ),
    );
  }

  function openReset(user) {
    resetting = user;
    document.getElementById("reset-user").textContent = user.name;
    resetForm.reset();
    say(resetError, "");
    dialog.showModal();
  }

  document.getElementById("reset-cancel").addEventListener("click", () => dialog.close());
  resetForm.addEventListener("submit", async (event) => {
    event.preventDefault();
    const input = document.getElementById("reset-password");
    if (input.value.length < 8) {
      say(resetError, "At least 8 characters.");
      input.focus();
      return;
    }
    try {
      await api("PUT", `/users/${encodeURIComponent(resetting.name)}/password`, { password: input.value });
      dialog.close();
      say(message, `New password set for ${resetting.name}; their sessions ended.`);
    } catch (err) {
      say(resetError, err.message);
    }
  });

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const name = form.elements.name.value.trim();
    const password = form.elements.password.value;
    if (!/^[a-z][a-z0-9_.-]{0,31}$/.test(name)) {
      say(formError, "User names are lower case, start with a letter, and use letters, digits, . _ or -.");
      form.elements.name.focus();
      return;
    }
    if (password && password.length < 8) {
      say(formError, "Passwords need at least 8 characters (or leave it empty to generate one).");
      form.elements.password.focus();
      return;
    }
    say(formError, "");
    const body = { name, is_admin: form.elements.is_admin.checked };
    if (password) body.password = password;
    const button = form.querySelector("button[type=submit]");
    lg.busy(button, "Creating…");
    try {
      const user = await api("POST", "/users", body);
      created.replaceChildren(
        h("p", {}, `Created ${user.name}.`),
        user.password
          ? h("p", {}, "Their generated password, shown only this once: ", h("code", { class: "copyable" }, user.password))
          : null,
      );
      created.hidden = false;
      created.focus();
      form.reset();
      await load();
    } catch (err) {
      say(formError, err.message);
    } finally {
      lg.idle(button);
    }
  });

  load().catch((err) => say(message, `Could not list users: ${err.message}`, "error"));
})();
