/* labgate: helpers shared by every page.
 *
 * Pages change nothing except through the REST API: `labgate.api()` sends
 * the session cookie and the CSRF token from <meta name="csrf-token">, and
 * turns error answers into `ApiError`s carrying the API's error code. A
 * session that ended (401 "unauthorized") goes to the sign-in page.
 */
"use strict";

window.labgate = (() => {
  const csrf = document.querySelector('meta[name="csrf-token"]')?.content || "";
  const ACTIVE = new Set(["queued", "pending", "starting", "running", "unreachable", "stopping"]);
  const TRANSITIONAL = new Set(["queued", "pending", "starting", "stopping"]);

  /* API details are lower-case phrases; on a page they read as sentences. */
  function sentence(text) {
    const trimmed = String(text || "").trim();
    if (!trimmed) return trimmed;
    const first = trimmed[0].toUpperCase() + trimmed.slice(1);
    return /[.!?…]$/.test(first) ? first : `${first}.`;
  }

  class ApiError extends Error {
    constructor(status, body) {
      super(sentence((body && body.detail) || `labgate answered with HTTP ${status}`));
      this.status = status;
      this.code = (body && body.error) || "http_error";
      this.body = body;
    }
  }

  function signIn(notice) {
    const params = new URLSearchParams({ next: location.pathname + location.search });
    if (notice) params.set("notice", notice);
    location.assign(`/login?${params}`);
  }

  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    const init = { method, headers, credentials: "same-origin", cache: "no-store" };
    if (method !== "GET") headers["X-CSRF-Token"] = csrf;
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    let response;
    try {
      response = await fetch(`/api/v1${path}`, init);
    } catch {
      throw new ApiError(0, { error: "network", detail: "labgate did not answer; check your connection." });
    }
    if (response.status === 204) return null;
    const data = await response.json().catch(() => null);
    if (!response.ok) {
      const error = new ApiError(response.status, data);
      if (response.status === 401 && error.code === "unauthorized") signIn("session_ended");
      throw error;
    }
    return data;
  }

  /* h("a", {href: "/", class: "x"}, "text", child): build DOM without innerHTML. */
  function h(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "dataset") Object.assign(node.dataset, value);
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  function size(bytes) {
    if (typeof bytes !== "number") return bytes == null ? "?" : String(bytes);
    let amount = bytes;
    for (const unit of ["B", "KiB", "MiB", "GiB"]) {
      if (amount < 1024) return `${+amount.toFixed(1)} ${unit}`;
      amount /= 1024;
    }
    return `${+amount.toFixed(1)} TiB`;
  }

  /* The size grammar of the API ("512M", "2 GiB", "1.5G"), in bytes; NaN if not one. */
  function parseSize(text) {
    const match = /^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$/i.exec(text);
    if (!match) return NaN;
    const factor = { "": 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 }[match[2].toLowerCase()];
    return Math.floor(parseFloat(match[1]) * factor);
  }

  function resources(r) {
    if (!r) return "";
    return `${r.cpu ?? "?"} CPU · ${size(r.memory)}`;
  }

  /* A span of seconds: "42 s", "4 min 12 s", "35 min", "3 h 10 min", "2 d 3 h". */
  function duration(seconds) {
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return `${s} s`;
    const minutes = Math.floor(s / 60);
    if (minutes < 10) return s % 60 ? `${minutes} min ${s % 60} s` : `${minutes} min`;
    if (minutes < 60) return `${minutes} min`;
    const hours = Math.floor(minutes / 60);
    if (hours < 48) return minutes % 60 ? `${hours} h ${minutes % 60} min` : `${hours} h`;
    const days = Math.floor(hours / 24);
    return hours % 24 ? `${days} d ${hours % 24} h` : `${days} d`;
  }

  /* "just now", or the duration since an ISO time. */
  function ago(iso, now = Date.now()) {
    if (!iso) return "—";
    const seconds = (now - Date.parse(iso)) / 1000;
    return seconds < 5 ? "just now" : duration(seconds);
  }

  /* "just now", "5 min ago". */
  function since(iso) {
    const text = ago(iso);
    return text === "just now" || text === "—" ? text : `${text} ago`;
  }

  function localTime(iso) {
    return iso ? new Date(iso).toLocaleString() : "";
  }

  /* Today: the time of day; otherwise the date. The full time is in the title. */
  function shortTime(iso) {
    const date = new Date(iso);
    if (date.toDateString() === new Date().toDateString()) {
      return date.toLocaleTimeString(undefined, { hour: "numeric", minute: "2-digit" });
    }
    return date.toLocaleDateString(undefined, { year: "numeric", month: "short", day: "numeric" });
  }

  function time(iso, text) {
    if (!iso) return "—";
    return h("time", { datetime: iso, title: localTime(iso) }, text ?? shortTime(iso));
  }

  function say(node, text, kind) {
    if (!node) return;
    node.textContent = text || "";
    node.hidden = !text;
    if (kind) node.dataset.kind = kind;
    else delete node.dataset.kind;
  }

  function stateBadge(state) {
    return h("span", { class: "state", dataset: { state } }, state);
  }

  /* Run `fn` now and again after `interval()` ms; paused while the tab is hidden. */
  function poll(fn, interval) {
    let timer = null;
    let running = false;
    let stopped = false;
    async function tick() {
      clearTimeout(timer);
      timer = null;
      if (stopped || running) return;
      running = true;
      try {
        await fn();
      } catch (error) {
        console.warn("labgate:", error);
      } finally {
        running = false;
      }
      if (!stopped && !document.hidden) timer = setTimeout(tick, interval());
    }
    document.addEventListener("visibilitychange", () => {
      if (!document.hidden && timer === null) tick();
    });
    tick();
    return {
      now: tick,
      stop() {
        stopped = true;
        clearTimeout(timer);
      },
    };
  }

  function busy(button, text) {
    if (!button.dataset.idleText) button.dataset.idleText = button.innerHTML;
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    button.textContent = text;
  }

  function idle(button) {
    button.disabled = false;
    button.removeAttribute("aria-busy");
    if (button.dataset.idleText) button.innerHTML = button.dataset.idleText;
  }

  document.addEventListener("DOMContentLoaded", () => {
    for (const node of document.querySelectorAll("time[data-format]")) {
      node.title = node.textContent;
      node.textContent = localTime(node.getAttribute("datetime"));
    }
  });

  return {
    ACTIVE, TRANSITIONAL, ApiError, api, h, size, parseSize, resources, duration, ago, since, time,
    localTime,
    sentence, say, stateBadge, poll, busy, idle, signIn,
  };
})();
