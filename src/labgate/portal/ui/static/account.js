/* Account: change your password with PUT /api/v1/users/me/password. That ends
 * every other session of yours; this one goes on (the answer renews its cookie). */
"use strict";

(() => {
  const lg = window.labgate;
  const form = document.getElementById("password-form");
  const error = document.getElementById("password-error");
  const done = document.getElementById("password-done");

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const current = form.elements.current_password;
    const fresh = form.elements.password;
    const confirmation = form.elements.confirm;
    for (const input of [current, fresh, confirmation]) input.removeAttribute("aria-invalid");
    lg.say(done, "");
    const shortest = Number(fresh.getAttribute("minlength")) || 8;
    let problem = null;
    if (!current.value) problem = [current, "Enter your current password."];
    else if (fresh.value.length < shortest) problem = [fresh, `The new password needs at least ${shortest} characters.`];
    else if (fresh.value !== confirmation.value) problem = [confirmation, "The two new passwords differ."];
    if (problem) {
      problem[0].setAttribute("aria-invalid", "true");
      lg.say(error, problem[1]);
      problem[0].focus();
      return;
    }
    const button = form.querySelector("button[type=submit]");
    lg.busy(button, "Changing…");
    try {
      await lg.api("PUT", "/users/me/password", { password: fresh.value, current_password: current.value });
      lg.idle(button);
      lg.say(error, "");
      form.reset();
      lg.say(done, "Your password was changed. Your other sessions are signed out; this one goes on.");
    } catch (err) {
      lg.idle(button);
      const wrong = err.code === "invalid_credentials";
      lg.say(error, wrong ? "The current password is wrong." : err.message);
      (wrong ? current : fresh).setAttribute("aria-invalid", "true");
      (wrong ? current : fresh).focus();
    }
  });
})();
