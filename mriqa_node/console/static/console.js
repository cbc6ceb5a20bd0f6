// mriqa-node console: live updates over server-sent events, the rescan alert (banner, tone,
// notification), acknowledgements, slice viewer and ratings. No build step, no framework.
"use strict";

const body = document.body;
const csrf = body.dataset.csrf;
const mayAck = body.dataset.mayAck === "yes";
// For tests and benchmarks: when each alert's banner became visible (ms since epoch).
window.mriqa = { bannerShownAt: {}, events: 0, tones: 0 };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "dataset") Object.assign(node.dataset, v); else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

async function api(method, path, payload) {
  const response = await fetch(path, {
    method, credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
    body: payload === undefined ? undefined : JSON.stringify(payload),
  });
  if (!response.ok && response.status !== 409) throw new Error(`${path}: ${response.status}`);
  return response.status === 409 ? null : response.json();
}

// -- sound and notifications ---------------------------------------------------------------
let audio = null;
function tone() {
  window.mriqa.tones += 1;
  if (!audio) return;
  const t0 = audio.currentTime;
  for (let i = 0; i < 3; i++) {  // three short high beeps: hard to miss, not a fire alarm
    const osc = audio.createOscillator(), gain = audio.createGain();
    osc.frequency.value = 880;
    gain.gain.setValueAtTime(0.0001, t0 + i * 0.35);
    gain.gain.exponentialRampToValueAtTime(0.6, t0 + i * 0.35 + 0.02);
    gain.gain.exponentialRampToValueAtTime(0.0001, t0 + i * 0.35 + 0.25);
    osc.connect(gain).connect(audio.destination);
    osc.start(t0 + i * 0.35); osc.stop(t0 + i * 0.35 + 0.3);
  }
}
function unlockAudio() {
  try { audio = audio || new AudioContext(); audio.resume(); } catch (e) { audio = null; }
}
const enable = document.getElementById("enable-alerts");
if (enable) {
  const needed = () => !audio || audio.state !== "running" ||
    ("Notification" in window && Notification.permission === "default");
  enable.hidden = !needed();
  enable.addEventListener("click", async () => {
    unlockAudio();
    if ("Notification" in window && Notification.permission === "default") {
      await Notification.requestPermission();
    }
    enable.hidden = !needed();
  });
  document.addEventListener("pointerdown", unlockAudio, { once: true });
}
function notify(alert) {
  if (!("Notification" in window) || Notification.permission !== "granted") return;
  const n = new Notification("Rescan? Non-diagnostic series", {
    body: `${alert.series_description || "Series"} from ${alert.calling_aet || "?"}: score ${(alert.score || 0).toFixed(2)}`,
    tag: `mriqa-alert-${alert.alert_id}`, requireInteraction: true,
  });
  n.onclick = () => { window.focus(); location.href = `/series/${alert.series_uid}`; };
}

// -- the alert banner ----------------------------------------------------------------------
const alertsBox = document.getElementById("alerts");

function bindBanner(banner) {
  const id = banner.dataset.alertId;
  window.mriqa.bannerShownAt[id] = window.mriqa.bannerShownAt[id] || Date.now();
  for (const button of banner.querySelectorAll("button[data-action]")) {
    button.addEventListener("click", async () => {
      button.disabled = true;
      const comment = banner.querySelector(".ack-comment")?.value || null;
      try {
        await api("POST", `/api/alerts/${id}/ack`, { action: button.dataset.action, comment });
        banner.remove();
        countAlerts();
      } catch (e) { button.disabled = false; alert(`Could not acknowledge: ${e.message}`); }
    });
  }
}

function showAlert(a) {
  if (!alertsBox || document.getElementById(`alert-${a.alert_id}`)) return;
  const worst = (a.worst_slices || []).map((w) => w.slice_index + 1).join(", ");
  const banner = el("section", { class: "alert-banner", id: `alert-${a.alert_id}`, role: "alert",
                                 dataset: { alertId: String(a.alert_id) } },
    el("div", { class: "alert-text" },
      el("strong", {}, "RESCAN? "), el("span", { class: "alert-series" }, a.series_description || "Series"),
      ` from ${a.calling_aet || "?"} is `, el("b", {}, "NON-DIAGNOSTIC"),
      ` (score ${(a.score || 0).toFixed(2)}). Worst slices: ${worst}. `,
      el("a", { href: `/series/${a.series_uid}` }, "View slices")));
  if (mayAck) {
    banner.append(el("div", { class: "alert-actions" },
      el("input", { type: "text", class: "ack-comment", placeholder: "Comment (optional)", maxlength: "2000" }),
      el("button", { type: "button", dataset: { action: "rescanned" } }, "Rescanned"),
      el("button", { type: "button", dataset: { action: "accepted" } }, "Accepted anyway"),
      el("button", { type: "button", dataset: { action: "disagree" } }, "Disagree")));
  }
  alertsBox.prepend(banner);
  bindBanner(banner);
  countAlerts();
  tone();
  notify(a);
}

function clearAlert(id) { document.getElementById(`alert-${id}`)?.remove(); countAlerts(); }

// Several open alerts: the newest is the banner and says how many more are open; the older
// ones are a compact list under it (console.css), so the series list stays on screen.
function countAlerts() {
  if (!alertsBox) return;
  const open = alertsBox.querySelectorAll(".alert-banner[data-alert-id]");
  alertsBox.querySelectorAll(".alert-more").forEach((m) => m.remove());
  if (open.length > 1) {
    const more = open.length - 1;
    open[0].querySelector(".alert-text").append(
      el("span", { class: "alert-more" }, ` ${more} more open alert${more > 1 ? "s" : ""} below.`));
  }
  alertsBox.classList.toggle("several", open.length > 1);
}

// Repeat the tone while an alert is open: the technologist may be at the patient.
setInterval(() => { if (alertsBox && alertsBox.children.length) tone(); }, 20000);
document.querySelectorAll(".alert-banner").forEach(bindBanner);
countAlerts();

// -- live series list ----------------------------------------------------------------------
let refreshTimer = null;
function refreshSeries() {
  if (body.dataset.page !== "live" || refreshTimer) return;
  refreshTimer = setTimeout(async () => {
    refreshTimer = null;
    const { items, total } = await api("GET", "/api/series?limit=100");
    const count = document.querySelector("h1 small");
    if (count) count.textContent = total > items.length ? `${total} in all, newest ${items.length} shown` : `${total} in all`;
    const rows = items.map((r) => {
      const label = r.label ? el("span", { class: `badge badge-${r.label}`, title: r.reason || "" }, r.label.replace("_", "-")) : "";
      const why = r.reason ? el("small", { class: "reason" }, r.reason.replace("not assessed: ", "")) : "";
      const slices = r.expected_slices ? `${r.slices} / ${r.expected_slices}` : `${r.slices}`;
      return el("tr", { class: `state-${r.display_state} label-${r.label || "none"}`, dataset: { seriesUid: r.series_uid } },
        el("td", {}, r.calling_aet || ""),
        el("td", {}, el("a", { href: `/series/${r.series_uid}` }, r.series_description || r.series_uid)),
        el("td", {}, el("time", { datetime: r.last_received_at }, r.last_received_at.slice(11, 19))),
        el("td", { class: "num" }, slices), el("td", {}, r.display_state), el("td", {}, label, why ? " " : "", why),
        el("td", { class: "num" }, r.score == null ? "" : r.score.toFixed(2)));
    });
    if (rows.length) document.getElementById("series-rows").replaceChildren(...rows);
  }, 150);
}

// -- the event stream ----------------------------------------------------------------------
const status = document.getElementById("live-status");
if (alertsBox) {
  const stream = new EventSource(`/api/events?after=${body.dataset.lastEventId || 0}`);
  stream.onopen = () => status && (status.className = "live-on");
  stream.onerror = () => {
    if (status) status.className = "live-off";
    // The browser retries a dropped connection by itself, but not a refused one (session
    // expired, proxy error): say so loudly, then reload (to the login page if need be).
    if (stream.readyState === EventSource.CLOSED) {
      alertsBox.prepend(el("section", { class: "alert-banner", role: "alert" },
        el("strong", {}, "Live alerts stopped. "), "Reconnecting..."));
      setTimeout(() => location.reload(), 3000);
    }
  };
  const on = (kind, handler) => stream.addEventListener(kind, (e) => {
    window.mriqa.events += 1;
    handler(JSON.parse(e.data));
  });
  on("alert", (m) => { showAlert(m.payload); refreshSeries(); });
  on("alert_acknowledged", (m) => clearAlert(m.payload.alert_id));
  for (const kind of ["verdict", "series_complete", "series_reopened", "progress"]) on(kind, refreshSeries);
}

// -- series page: viewer, heat maps, ratings -----------------------------------------------
const grid = document.getElementById("slices");
if (grid) {
  const head = document.querySelector(".series-head");
  const seriesUid = head.dataset.seriesUid;
  const heat = document.getElementById("show-heat");
  const viewer = document.getElementById("viewer");
  heat.addEventListener("change", () => {
    grid.classList.toggle("no-heat", !heat.checked);
    viewer.classList.toggle("no-heat", !heat.checked);
  });
  grid.addEventListener("click", async (e) => {
    const figure = e.target.closest(".slice");
    if (!figure) return;
    const base = `/api/series/${seriesUid}/slices/${figure.dataset.instanceId}/${figure.dataset.frame}`;
    const rate = e.target.closest("button.rate");
    if (rate) {
      await api("POST", "/api/ratings", { series_uid: seriesUid, sop_instance_uid: figure.dataset.sop,
                                          frame: Number(figure.dataset.frame), value: Number(rate.dataset.value) });
      figure.querySelectorAll("button.rate").forEach((b) => b.classList.toggle("chosen", b === rate));
      return;
    }
    if (!e.target.closest(".pic")) return;
    const [img, overlay] = viewer.querySelectorAll("img");
    img.src = `${base}/image.png?size=512`;
    overlay.src = figure.querySelector(".heat") ? `${base}/heatmap.png?size=512&v=${head.dataset.heatVersion}` : "";
    overlay.hidden = !figure.querySelector(".heat");
    viewer.querySelector(".caption").textContent = figure.querySelector("figcaption").textContent.replace(/\s+/g, " ");
    viewer.showModal();
  });
  document.querySelectorAll(".rate-series button.rate").forEach((b) => b.addEventListener("click", async () => {
    await api("POST", "/api/ratings", { series_uid: seriesUid, value: Number(b.dataset.value) });
    document.querySelectorAll(".rate-series button.rate").forEach((x) => x.classList.toggle("chosen", x === b));
  }));
}
