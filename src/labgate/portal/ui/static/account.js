/* Account: change your password with PUT /api/v1/users/me/password. That ends
 * every session of yours, this one too, so the page goes to sign-in afterwards. */
"use strict";

(() => {
  const lg = window.labgate;
  const form = document.getElementById("password-form");
  const error = document.getElementById("password-error");

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const current = form.elements.current_password;
    const fresh = form.elements.password;
    const confirmation = form.elements.confirm;
    for (const input of [current, fresh, confirmation]) input.removeAttribute("aria-invalid");
    let problem = null;
    if (!current.value) problem = [current, "Enter your current password."];
    else if (fresh.value.length < 8) problem = [fresh, "The new password needs at least 8 characters."];
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
      location.assign("/login?notice=password_changed");
    } catch (err) {
      lg.idle(button);
      const wrong = err.code === "invalid_credentials";
      lg.say(error, wrong ? "The current password is wrong." : err.message);
      (wrong ? current : fresh).setAttribute("aria-invalid", "true");
      (wrong ? current : fresh).focus();
    }
  });
})();
