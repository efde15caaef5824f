/* The idle-stop countdown and keep-alive on an instance page.
 *
 * GET /api/v1/instances/<id>/keep-alive says when the instance will be
 * stopped if nobody uses it (cull_at) and why (idle, or its maximum
 * lifetime); the countdown ticks every second and is fetched again every
 * 30 s, because use moves the idle stop back. PUT with {"for": seconds}
 * keeps it alive (the server caps it at keep_alive_max), DELETE ends that.
 * `labgate.keepAlive(id)` returns {start, stop, refresh}; instance.js starts
 * it when the instance runs and refreshes it on a cull warning. */
"use strict";

(() => {
  const lg = window.labgate;
  const { api, say, duration } = lg;
  const CHOICES = [
    [3600, "1 hour"],
    [4 * 3600, "4 hours"],
    [8 * 3600, "8 hours"],
    [24 * 3600, "24 hours"],
    [3 * 86400, "3 days"],
    [7 * 86400, "7 days"],
  ];

  function clock(iso) {
    const date = new Date(iso);
    const sameDay = date.toDateString() === new Date().toDateString();
    const options = sameDay
      ? { hour: "numeric", minute: "2-digit" }
      : { month: "short", day: "numeric", hour: "numeric", minute: "2-digit" };
    return date.toLocaleString(undefined, options);
  }

  function keepAlive(id) {
    const $ = (name) => document.getElementById(name);
    const section = $("keep-alive");
    const countdown = $("countdown");
    const select = $("keep-for");
    const error = $("keep-error");
    const off = $("keep-off");
    const path = `/instances/${encodeURIComponent(id)}/keep-alive`;
    let status = null;
    let fetchedAt = 0;
    let ticker = null;
    let poller = null;

    function fillChoices(max) {
      if (select.dataset.max === String(max)) return;
      select.dataset.max = String(max);
      const fits = CHOICES.filter(([seconds]) => seconds <= max);
      if (!fits.length || fits[fits.length - 1][0] < max) fits.push([max, `${duration(max)} (the longest allowed)`]);
      select.replaceChildren(...fits.map(([seconds, label]) => lg.h("option", { value: seconds }, label)));
    }

    /* The sentence for the current status, `left` seconds before the stop. */
    function sentence(left) {
      const at = clock(status.cull_at);
      if (status.cull_reason === "lifetime") {
        return `Stops in ${duration(left)} (at ${at}): its maximum lifetime ends then. A keep-alive does not extend it.`;
      }
      const kept = status.keep_alive_until && Date.parse(status.keep_alive_until) >= Date.parse(status.cull_at) - 1000;
      if (kept) return `Kept alive until ${at}: stops in ${duration(left)} unless it is used.`;
      return `Stops in ${duration(left)} (at ${at}) if nobody uses it.`;
    }

    function render() {
      if (!status) return;
      section.hidden = false;
      const open = status.state === "running";
      // Those it is shared with see when it stops; only its owner (or an admin) keeps it.
      const access = document.getElementById("instance")?.dataset.access || "owner";
      const manages = access === "owner" || access === "admin";
      const canKeep = manages && open && status.cull_at !== null && status.keep_alive_max > 0;
      $("keep-alive-form").hidden = !canKeep;
      off.hidden = !status.keep_alive_until;
      if (!open) {
        say(countdown, "");
        return;
      }
      if (status.cull_at === null) {
        say(countdown, "This instance is not stopped for being idle.");
        return;
      }
      const left = status.cull_in - (Date.now() - fetchedAt) / 1000;
      say(countdown, sentence(left), left <= status.cull_warning ? "warning" : undefined);
    }

    async function refresh() {
      status = await api("GET", path);
      fetchedAt = Date.now();
      fillChoices(status.keep_alive_max);
      render();
    }

    async function change(button, method, body) {
      say(error, "");
      lg.busy(button, method === "PUT" ? "Keeping…" : "Ending…");
      try {
        status = await api(method, path, body);
        fetchedAt = Date.now();
        render();
        if (status.capped) say(error, `Kept for the longest allowed, ${duration(status.keep_alive_max)}.`);
      } catch (err) {
        say(error, err.message);
      } finally {
        lg.idle(button);
      }
    }

    $("keep-alive-form").addEventListener("submit", (event) => {
      event.preventDefault();
      change($("keep"), "PUT", { for: Number(select.value) });
    });
    off.addEventListener("click", (event) => change(event.currentTarget, "DELETE"));

    return {
      start() {
        if (poller) return;
        poller = lg.poll(refresh, () => 30_000);
        ticker = setInterval(render, 1000);
      },
      stop() {
        poller?.stop();
        clearInterval(ticker);
        poller = null;
        section.hidden = true;
      },
      refresh: () => refresh().catch((err) => console.warn("labgate:", err)),
    };
  }

  lg.keepAlive = keepAlive;
})();
