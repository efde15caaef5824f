/* The sharing panel of an instance page (its owner's and admins'): share with a user
 * or group, stop sharing, create and revoke share links. Every change goes through
 * the REST API; the page then reloads to show the new state from the server. */
"use strict";

(() => {
  const { api } = window.labgate;
  const page = document.getElementById("instance");
  const id = encodeURIComponent(page.dataset.id);
  const error = document.getElementById("share-error");

  function fail(err) {
    error.textContent = err.message;
    error.hidden = false;
  }

  document.getElementById("share-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const who = document.getElementById("share-who").value.trim();
    const access = document.getElementById("share-access").value;
    if (!who) return;
    const body = who.startsWith("group:") ? { group: who.slice(6), access } : { user: who, access };
    try {
      await api("POST", `/instances/${id}/shares`, body);
      location.reload();
    } catch (err) {
      fail(err);
    }
  });

  for (const button of document.querySelectorAll("button.unshare")) {
    button.addEventListener("click", async () => {
      try {
        await api("DELETE", `/instances/${id}/shares/${button.dataset.share}`);
        location.reload();
      } catch (err) {
        fail(err);
      }
    });
  }

  for (const button of document.querySelectorAll("button.revoke-link")) {
    button.addEventListener("click", async () => {
      try {
        await api("DELETE", `/instances/${id}/links/${button.dataset.link}`);
        location.reload();
      } catch (err) {
        fail(err);
      }
    });
  }

  document.getElementById("link-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const seconds = Number(document.getElementById("link-expiry").value);
    try {
      const link = await api("POST", `/instances/${id}/links`, { expires_in: seconds });
      const field = document.getElementById("new-link-url");
      field.value = link.url;
      document.getElementById("new-link").hidden = false;
      field.select();
    } catch (err) {
      fail(err);
    }
  });
})();
