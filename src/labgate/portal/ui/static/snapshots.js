/* Snapshots, on the snapshots page and an instance's page: save one (instance page),
 * share, stop sharing, delete, launch. Every change goes through the REST API; the
 * page then reloads to show the new state from the server, except for snapshots
 * still saving, whose row is kept up to date by polling. */
"use strict";

(() => {
  const { api, busy, idle, poll, size } = window.labgate;
  const error = document.getElementById("snapshot-error");

  function fail(err) {
    error.textContent = err.message;
    error.hidden = false;
  }

  /* Run an API call for a button; reload on success, show the reason otherwise. */
  function action(button, text, call) {
    button.addEventListener("click", async () => {
      busy(button, text);
      try {
        await call();
        location.reload();
      } catch (err) {
        idle(button);
        fail(err);
      }
    });
  }

  const form = document.getElementById("snapshot-form");
  if (form) {
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const page = document.getElementById("instance");
      const button = document.getElementById("take-snapshot");
      const name = document.getElementById("snapshot-name").value.trim();
      busy(button, "Saving…");
      try {
        await api("POST", `/instances/${encodeURIComponent(page.dataset.id)}/snapshot`, { name });
        location.reload();
      } catch (err) {
        idle(button);
        fail(err);
      }
    });
  }

  for (const row of document.querySelectorAll("#snapshots tr[data-snapshot]")) {
    const id = encodeURIComponent(row.dataset.snapshot);
    const launch = row.querySelector("button.launch-snapshot");
    const remove = row.querySelector("button.delete-snapshot");
    if (launch) {
      launch.addEventListener("click", async () => {
        busy(launch, "Launching…");
        try {
          const instance = await api("POST", "/instances", { snapshot: row.dataset.snapshot });
          location.assign(`/instances/${encodeURIComponent(instance.id)}`);
        } catch (err) {
          idle(launch);
          fail(err);
        }
      });
    }
    if (remove) action(remove, "Deleting…", () => api("DELETE", `/snapshots/${id}`));
    for (const button of row.querySelectorAll("button.unshare-snapshot")) {
      action(button, "…", () =>
        api("DELETE", `/snapshots/${id}/shares/${encodeURIComponent(button.dataset.user)}`));
    }
    const share = row.querySelector("form.share-snapshot");
    if (share) {
      share.addEventListener("submit", async (event) => {
        event.preventDefault();
        const user = share.elements.user.value.trim();
        if (!user) return;
        try {
          await api("PUT", `/snapshots/${id}/shares/${encodeURIComponent(user)}`);
          location.reload();
        } catch (err) {
          fail(err);
        }
      });
    }
    if (row.dataset.state === "saving") {
      const watch = poll(async () => {
        const snapshot = await api("GET", `/snapshots/${id}`);
        if (snapshot.state === "saving") return;
        watch.stop();
        row.dataset.state = snapshot.state;
        const badge = row.querySelector(".state");
        badge.dataset.state = snapshot.state;
        badge.textContent = snapshot.state;
        if (snapshot.size) row.querySelector(".snapshot-size").textContent = size(snapshot.size);
        if (launch) launch.disabled = snapshot.state !== "ready";
        if (remove) remove.disabled = false;
        if (snapshot.reason) fail(new Error(window.labgate.sentence(snapshot.reason)));
      }, () => 1000);
    }
  }
})();
