// hubspot-sidecar pages: the few things HTML cannot do on its own.
"use strict";
(function () {
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrf = csrfMeta ? csrfMeta.content : "";

  // The return page of HubSpot's OAuth redirect. In a popup, a success tells
  // the page that opened it and closes; a refusal stays open to be read (the
  // page behind reloads when it is closed). In a full window, it goes back.
  const result = document.querySelector("[data-oauth-result]");
  if (result) {
    const popup = window.opener && !window.opener.closed;
    if (popup && result.dataset.ok === "true") {
      try {
        window.opener.postMessage("hubspot-connect-done", location.origin);
      } catch (e) { /* the opener navigated away */ }
      window.close();
    } else if (!popup && result.dataset.return && result.dataset.ok === "true") {
      location.replace(result.dataset.return);
    }
    return;
  }

  // The operator's destructive forms ask first.
  document.querySelectorAll("form[data-confirm]").forEach(function (form) {
    form.addEventListener("submit", function (ev) {
      if (!window.confirm(form.dataset.confirm)) ev.preventDefault();
    });
  });

  const integration = document.getElementById("integration");
  if (!integration) return;
  const base = location.pathname.replace(/\/$/, "");
  const message = document.getElementById("message");

  function say(text, problem) {
    message.textContent = text;
    message.classList.toggle("problem", !!problem);
  }

  async function post(path, body) {
    const resp = await fetch(base + path, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body || {}),
      credentials: "same-origin",
    });
    let data = {};
    try { data = await resp.json(); } catch (e) { /* not JSON */ }
    if (!resp.ok) throw new Error(data.error || ("the sidecar answered " + resp.status));
    return data;
  }

  // Connect and Reconnect: HubSpot's page opens in a window, as the seed
  // describes; when the window closes this page shows the new state.
  document.querySelectorAll('[data-action="connect"]').forEach(function (button) {
    button.addEventListener("click", async function () {
      const popup = window.open("", "hubspot-connect", "popup,width=560,height=720");
      button.disabled = true;
      say("Opening HubSpot…");
      try {
        const data = await post("/connect");
        if (popup) {
          popup.location.href = data.authorize_url;
          const watch = setInterval(function () {
            if (popup.closed) { clearInterval(watch); location.reload(); }
          }, 400);
        } else {
          location.assign(data.authorize_url); // popups blocked: go there in this window
        }
      } catch (e) {
        if (popup) popup.close();
        button.disabled = false;
        say(e.message, true);
      }
    });
  });
  window.addEventListener("message", function (ev) {
    if (ev.origin === location.origin && ev.data === "hubspot-connect-done") location.reload();
  });

  // Sign out ends this browser's session; the page then says so.
  const signOut = document.querySelector('[data-action="sign-out"]');
  if (signOut) {
    signOut.addEventListener("click", async function () {
      signOut.disabled = true;
      try {
        await post("/signout");
        location.reload();
      } catch (e) {
        signOut.disabled = false;
        say(e.message, true);
      }
    });
  }

  // Disconnect asks in a dialog; the dialog keeps the focus while open.
  const dialog = document.getElementById("confirm-disconnect");
  const opener = document.querySelector('[data-action="disconnect"]');
  if (opener && dialog) {
    opener.addEventListener("click", function () { dialog.showModal(); });
    dialog.querySelector('[data-action="cancel"]').addEventListener("click", function () { dialog.close(); });
    dialog.addEventListener("close", function () { opener.focus(); });
    dialog.querySelector('[data-action="confirm-disconnect"]').addEventListener("click", async function (ev) {
      ev.target.disabled = true;
      try {
        await post("/disconnect");
        location.reload();
      } catch (e) {
        dialog.close();
        say(e.message, true);
      } finally {
        ev.target.disabled = false;
      }
    });
  }

  // Each switch applies at once; a refusal puts it back and says why.
  document.querySelectorAll("input[data-setting]").forEach(function (input) {
    input.addEventListener("change", async function () {
      const name = input.dataset.setting;
      const on = input.checked;
      const body = name === "create_contacts" ? { create_contacts: on } : { activities: { [name]: on } };
      input.disabled = true;
      try {
        await post("/settings", body);
        const label = document.querySelector('label[for="' + name + '"]').textContent;
        say(label + (on ? " is on." : " is off."));
      } catch (e) {
        input.checked = !on;
        say(e.message, true);
      } finally {
        input.disabled = false;
      }
    });
  });

  // The state changes on its own too (a failure, the end of the first
  // synchronisation): the counts follow, and a new state reloads the page.
  const poll = setInterval(async function () {
    try {
      const resp = await fetch(base + "/status", { credentials: "same-origin" });
      if (resp.status === 403) {
        clearInterval(poll);
        const data = await resp.json().catch(function () { return {}; });
        say(data.error || "This page's session has ended.", true);
        return;
      }
      if (!resp.ok) return;
      const v = await resp.json();
      if (v.status !== integration.dataset.status ||
          String(v.backfill.running) !== integration.dataset.backfill) {
        location.reload();
        return;
      }
      document.getElementById("backlog").textContent = v.backlog.properties + v.backlog.activities;
      document.getElementById("dead-letters").textContent = v.dead_letters;
      const backfill = document.getElementById("backfill");
      if (backfill) backfill.textContent = v.backfill.queued + " of " + v.backfill.members + " members";
    } catch (e) { /* the sidecar restarts; try again */ }
  }, 3000);
})();
