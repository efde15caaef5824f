/* Tools page: launch a tool from its card (POST /api/v1/instances), then follow
 * its progress on /instances/<id>. */
"use strict";

(() => {
  const { api, parseSize, size, say, busy, idle } = window.labgate;

  function invalid(input, problem, problems) {
    input.setAttribute("aria-invalid", "true");
    problems.push({ input, problem });
  }

  function requestedResources(form, problems) {
    const resources = {};
    const cpu = form.elements.cpu;
    const memory = form.elements.memory;
    for (const input of [cpu, memory]) input?.removeAttribute("aria-invalid");
    if (cpu && cpu.value.trim() !== cpu.dataset.default) {
      const value = Number(cpu.value);
      if (!cpu.value.trim() || !Number.isFinite(value) || value <= 0) {
        invalid(cpu, "CPUs must be a positive number.", problems);
      } else if (value > Number(cpu.max)) {
        invalid(cpu, `At most ${cpu.max} CPUs.`, problems);
      } else {
        resources.cpu = value;
      }
    }
    if (memory && memory.value.trim() !== memory.dataset.default) {
      const bytes = parseSize(memory.value);
      if (!(bytes > 0)) {
        invalid(memory, "Memory must be a size like 512M or 2G.", problems);
      } else if (bytes > Number(memory.dataset.max)) {
        invalid(memory, `At most ${size(Number(memory.dataset.max))} of memory.`, problems);
      } else {
        resources.memory = memory.value.trim();
      }
    }
    return resources;
  }

  /* The launch parameters' values as typed; the API checks them (422 naming the one refused). */
  function params(form) {
    const values = {};
    for (const field of form.querySelectorAll(".field.param")) {
      const input = field.querySelector("input, select");
      input.removeAttribute("aria-invalid");
      if (input.type === "checkbox") values[field.dataset.param] = input.checked;
      else if (input.value.trim() !== "") values[field.dataset.param] = input.value.trim();
    }
    return values;
  }

  /* The chosen site (if any) and its launch choices that differ from the site's defaults. */
  function siteChoices(form) {
    const select = form.querySelector("select.site-select");
    const boxes = form.querySelectorAll(".site-options");
    const site = select ? select.value : boxes[0]?.dataset.site || "";
    const options = {};
    for (const box of boxes) {
      if (box.dataset.site !== site) continue;
      for (const field of box.querySelectorAll(".field.option")) {
        const input = field.querySelector("select");
        input.removeAttribute("aria-invalid");
        if (input.value !== "" && input.value !== input.dataset.default) {
          options[field.dataset.option] = input.value;
        }
      }
    }
    return { site: (select || Object.keys(options).length) ? site : "", options };
  }

  /* Show the launch choices of the site picked in the form's site select. */
  function showSite(event) {
    const form = event.currentTarget.form;
    for (const box of form.querySelectorAll(".site-options")) {
      box.hidden = box.dataset.site !== event.currentTarget.value;
    }
  }

  async function launch(event) {
    event.preventDefault();
    const form = event.currentTarget;
    const error = form.querySelector(".form-error");
    const button = form.querySelector("button[type=submit]");
    const problems = [];
    const resources = requestedResources(form, problems);
    if (problems.length) {
      form.querySelector("details").open = true;
      say(error, problems.map((p) => p.problem).join(" "));
      problems[0].input.focus();
      return;
    }
    say(error, "");
    const body = { tool: form.dataset.tool };
    if (Object.keys(resources).length) body.resources = resources;
    const values = params(form);
    if (Object.keys(values).length) body.params = values;
    const { site, options } = siteChoices(form);
    if (site) body.site = site;
    if (Object.keys(options).length) body.options = options;
    busy(button, "Launching…");
    try {
      const instance = await api("POST", "/instances", body);
      location.assign(`/instances/${encodeURIComponent(instance.id)}`);
    } catch (err) {
      idle(button);
      say(error, err.message);
      const name = err.body && err.body.param;
      const option = err.body && err.body.option;
      const field =
        (name && form.querySelector(`.field.param[data-param="${CSS.escape(name)}"]`)) ||
        (option &&
          form.querySelector(
            `.site-options[data-site="${CSS.escape(site)}"] .field.option[data-option="${CSS.escape(option)}"]`,
          ));
      if (field) {
        const input = field.querySelector("input, select");
        input.setAttribute("aria-invalid", "true");
        input.focus();
      }
    }
  }

  for (const form of document.querySelectorAll("form.launch-form")) {
    form.addEventListener("submit", launch);
    form.querySelector("select.site-select")?.addEventListener("change", showSite);
  }

  const quota = document.getElementById("quota");
  const me = document.body.dataset.user;
  if (quota && me) {
    const max = Number(quota.dataset.max);
    api("GET", `/instances?active=true&user=${encodeURIComponent(me)}&limit=1000`)
      .then((list) => {
        if (!list.length) return;
        quota.replaceChildren(
          `You have ${list.length}${max ? ` of ${max}` : ""} instance${(max || list.length) === 1 ? "" : "s"} active. `,
          window.labgate.h("a", { href: "/instances" }, "My instances"),
        );
      })
      .catch(() => {});
  }
})();
