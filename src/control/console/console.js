// The livemount console: polls the control API every 2 s and draws what it says. Every action
// calls the same /v1 routes as the CLI; a refusal shows the API's own message. Signed in with a
// session cookie (HttpOnly: this script never sees it); changes carry the session's CSRF value.
"use strict";

const POLL_MS = 2000;
const SNAPSHOTS_EVERY = 5; // polls between two snapshot listings
let csrf = null;
let timer = null;
let polls = 0;
const cards = new Map(); // mount name -> {root, facts, finish, cancel, signature}
const last = {}; // what each view was drawn from, to redraw only on change

const $ = (id) => document.getElementById(id);

// el("p", {class: "x"}, "text", child...): text is always text, never HTML.
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === false || v === null || v === undefined) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const k of kids.flat()) {
    if (k === null || k === undefined || k === false) continue;
    e.append(k instanceof Node ? k : String(k));
  }
  return e;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n : n.toFixed(1)) + " " + units[i];
}
const mbps = (b) => (b / 1e6).toFixed(1) + " MB/s";
const pct = (r) => (r === null || r === undefined ? "–" : (100 * r).toFixed(1) + " %");
function duration(s) {
  if (s === null || s === undefined) return "–";
  s = Math.ceil(s);
  if (s < 60) return s + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
  return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
}
const when = (t) => new Date(t).toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");

function say(text, kind) {
  const m = $("message");
  $("message-text").textContent = text;
  m.className = kind || "info";
  m.hidden = !text;
  m.setAttribute("role", kind === "error" ? "alert" : "status");
}

$("message-close").addEventListener("click", () => say("", ""));

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path, body) {
  const headers = {};
  if (method !== "GET") headers["X-Livemount-CSRF"] = csrf || "";
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {
    method, headers, credentials: "same-origin", cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = null; }
  if (!r.ok) {
    const msg = data && data.error ? data.error : (text || r.statusText);
    throw new ApiError(r.status, msg);
  }
  return data;
}

// An action: runs it, shows the API's refusal or `done`, and polls at once.
async function act(what, fn, done) {
  say(what + "…", "info");
  try {
    const r = await fn();
    say(typeof done === "function" ? done(r) : done, "ok");
    polls = 0; // the snapshot list too (a profile may be gone)
    await poll();
    return true;
  } catch (e) {
    if (e.status === 401) signedOut(e.message);
    else say(e.message, "error");
    return false;
  }
}

// ---- sign-in -------------------------------------------------------------------------------

function signedOut(why) {
  csrf = null;
  clearTimeout(timer);
  $("app").hidden = true;
  $("sign-out").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = why || "";
  say("", "");
  $("token").focus();
}

function signedIn(reply) {
  csrf = reply.csrf;
  $("signin").hidden = true;
  $("signin-error").textContent = "";
  $("app").hidden = false;
  $("sign-out").hidden = false;
  polls = 0;
  poll();
}

$("signin-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const token = $("token").value;
  try {
    const r = await api("POST", "/v1/session", { token });
    $("token").value = "";
    signedIn(r);
  } catch (e) {
    $("signin-error").textContent = e.message;
    $("token").select();
  }
});

$("sign-out").addEventListener("click", async () => {
  try { await api("DELETE", "/v1/session"); } catch (_) { /* signed out either way */ }
  signedOut("Signed out.");
});

// ---- polling -------------------------------------------------------------------------------

async function poll() {
  clearTimeout(timer);
  if (!csrf) return;
  try {
    const wantSnapshots = polls % SNAPSHOTS_EVERY === 0;
    const [status, mounts, relocations, stats, snapshots] = await Promise.all([
      api("GET", "/v1/status"),
      api("GET", "/v1/mounts"),
      api("GET", "/v1/relocations"),
      api("GET", "/v1/stats"),
      wantSnapshots ? api("GET", "/v1/snapshots") : Promise.resolve(null),
    ]);
    polls++;
    drawServer(status);
    drawMounts(mounts);
    drawRelocations(relocations, mounts);
    drawCache(stats);
    drawChart(stats);
    if (snapshots) drawSnapshots(snapshots);
    document.body.dataset.polled = String(Date.now());
  } catch (e) {
    if (e.status === 401) { signedOut(e.message); return; }
    say("Cannot reach the server: " + e.message, "error");
  }
  timer = setTimeout(poll, POLL_MS);
}

function drawServer(s) {
  $("server").textContent = `version ${s.version} · NFS ${s.advertise}:${s.nfs_port}${s.export}` +
    ` · ${s.mounts} mount${s.mounts === 1 ? "" : "s"} · repository ${s.repository}`;
}

// ---- mounts --------------------------------------------------------------------------------

function copyButton(label, text) {
  const b = el("button", { type: "button", class: "copy" }, "Copy");
  b.setAttribute("aria-label", "Copy " + label);
  b.addEventListener("click", async () => {
    let ok = false;
    try {
      await navigator.clipboard.writeText(text);
      ok = true;
    } catch (_) {
      // Plain http beyond loopback has no clipboard API: copy through a selection.
      const t = el("textarea", { class: "offscreen", readonly: true });
      t.value = text;
      document.body.append(t);
      t.select();
      try { ok = document.execCommand("copy"); } catch (_) { ok = false; }
      t.remove();
    }
    b.textContent = ok ? "Copied" : "Select and copy";
    setTimeout(() => { b.textContent = "Copy"; }, 2000);
  });
  return b;
}

function attachBlock(title, lines) {
  if (!lines || lines.length === 0) return null;
  const text = lines.join("\n");
  return el("div", { class: "attach" },
    el("div", { class: "attach-head" }, el("h4", {}, title), copyButton(title, text)),
    el("pre", { tabindex: "0" }, text));
}

function bootText(m) {
  const out = [];
  const w = m.boot && m.boot.window;
  if (w) {
    out.push(["Boot window", `${w.state}: ${w.hits} hits, ${w.misses} misses, storage wait ${w.storage_wait_seconds.toFixed(1)} s`]);
  } else {
    out.push(["Boot window", "not recorded"]);
  }
  const p = m.boot && m.boot.prestage;
  if (p) {
    const done = p.fetched + p.cached + p.failed;
    out.push(["Pre-staging", `${p.finished ? "done" : "running"}: ${done} of ${p.chunks} chunks (${bytes(p.bytes)})` +
      (p.failed ? `, ${p.failed} failed` : "")]);
  } else {
    out.push(["Pre-staging", "none (no boot profile, or off)"]);
  }
  return out;
}

function newCard(m) {
  const name = m.spec.name;
  const facts = el("dl", { class: "facts" });
  const finish = el("button", { type: "button", hidden: true }, "Finish relocation");
  const cancel = el("button", { type: "button", hidden: true }, "Cancel relocation");
  finish.addEventListener("click", () => act(`Finishing the relocation of ${name}`,
    () => api("POST", `/v1/mounts/${encodeURIComponent(name)}/relocation/finish`),
    (r) => `Relocation of ${name}: ${r.phase}` + (r.phase === "done"
      ? (r.config ? `; the VM's config is ${r.config}` : "")
      : "; the Relocations list says when the handover is done")));
  cancel.addEventListener("click", () => act(`Cancelling the relocation of ${name}`,
    () => api("DELETE", `/v1/mounts/${encodeURIComponent(name)}/relocation`),
    `Relocation of ${name} cancelled; the mount runs as before.`));
  const unmount = el("button", { type: "button", class: "danger" }, "Unmount…");
  unmount.addEventListener("click", () => confirmUnmount(name, m.spec.read_only));
  const a = m.attach || {};
  const details = el("details", { class: "attach-all" },
    el("summary", {}, "Attach instructions"),
    attachBlock("ESXi", a.esxi),
    attachBlock("KVM", a.kvm),
    attachBlock("Disk URLs", a.disk_urls),
    attachBlock("Block devices", a.block));
  const root = el("article", { class: "card", "data-mount": name },
    el("h3", {}, name),
    facts,
    details,
    el("div", { class: "buttons" }, finish, cancel, unmount));
  return { root, facts, finish, cancel, signature: "" };
}

function drawMounts(mounts) {
  $("no-mounts").hidden = mounts.length > 0;
  const seen = new Set();
  const box = $("mounts");
  for (const m of mounts) {
    const name = m.spec.name;
    seen.add(name);
    let c = cards.get(name);
    if (!c || c.id !== m.spec.id) {
      if (c) c.root.remove();
      c = newCard(m);
      c.id = m.spec.id;
      cards.set(name, c);
      box.append(c.root);
    }
    const r = m.relocation;
    const rows = [
      ["Snapshot", m.spec.snapshot_name],
      ["Mode", (m.spec.read_only ? "read-only" : "read-write") + (m.spec.disks_only ? ", disks only" : "")],
      ["Network", m.spec.network],
      ["Allowed hosts", m.spec.hosts && m.spec.hosts.length ? m.spec.hosts.join(", ") : "all the server allows"],
      ["Disks", m.files.filter((f) => f.disk).map((f) => `${f.name} (${bytes(f.size)})`).join(", ")],
      ...bootText(m),
      ["Relocation", r ? `${r.phase}, ${bytes(r.copied)} of ${bytes(r.total)}` : "none"],
    ];
    const sig = JSON.stringify(rows);
    if (sig !== c.signature) {
      c.signature = sig;
      c.facts.replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
    }
    const active = r && ["copying", "synced", "failed"].includes(r.phase);
    c.finish.hidden = !(r && ["copying", "synced"].includes(r.phase));
    c.cancel.hidden = !active;
  }
  for (const [name, c] of cards) {
    if (!seen.has(name)) { c.root.remove(); cards.delete(name); }
  }
  $("relocate-form").hidden = mounts.length === 0;
  // The relocation form's list of mounts, keeping the choice.
  const sel = $("relocate-mount");
  const names = mounts.map((m) => m.spec.name);
  if (JSON.stringify(names) !== last.names) {
    last.names = JSON.stringify(names);
    const keep = sel.value;
    sel.replaceChildren(...names.map((n) => el("option", { value: n }, n)));
    if (names.includes(keep)) sel.value = keep;
  }
}

function confirmUnmount(name, readOnly) {
  const d = $("confirm");
  $("confirm-title").textContent = `Unmount ${name}?`;
  $("confirm-text").textContent = `The VM must be powered off and unregistered first: its disks ` +
    `disappear from the datastore at once.`;
  const keep = $("confirm-keep");
  keep.checked = false;
  keep.disabled = readOnly;
  const loss = () => {
    $("confirm-loss").textContent = readOnly
      ? "The mount is read-only: nothing was written, nothing is lost."
      : keep.checked
        ? "The VM's writes are kept in the state directory; mounting this snapshot again under this name brings them back."
        : "Everything the VM wrote since the mount is discarded and cannot be recovered.";
    $("confirm-ok").textContent = keep.checked || readOnly ? "Unmount" : "Unmount and discard the writes";
  };
  keep.onchange = loss;
  loss();
  d.returnValue = "";
  d.onclose = () => {
    if (d.returnValue !== "ok") { say(`${name} stays mounted.`, "info"); return; }
    const keepWrites = keep.checked;
    act(`Unmounting ${name}`,
      () => api("DELETE", `/v1/mounts/${encodeURIComponent(name)}` + (keepWrites ? "?keep_writes=true" : "")),
      `${name} unmounted` + (keepWrites ? "; its writes are kept." : "; its writes are discarded."));
  };
  d.showModal();
  $("confirm-cancel").focus();
}

// ---- relocations ---------------------------------------------------------------------------

function drawRelocations(list) {
  const sig = JSON.stringify(list);
  if (sig === last.relocations) return;
  last.relocations = sig;
  $("no-relocations").hidden = list.length > 0;
  const rows = list.map((r) => {
    const frac = r.total > 0 ? r.copied / r.total : (r.phase === "done" ? 1 : 0);
    const pctText = (100 * frac).toFixed(0) + " %";
    const running = ["copying", "synced", "finishing"].includes(r.phase);
    return el("article", { class: "card relocation", "data-relocation": r.mount },
      el("h3", {}, `${r.mount} → ${r.dest}`),
      el("div", { class: "progress-line" },
        el("progress", { max: String(r.total || 1), value: String(r.phase === "done" ? (r.total || 1) : r.copied),
          "aria-label": `Relocation of ${r.mount}: ${pctText}` }),
        el("span", { class: "phase" }, `${r.phase} · ${pctText}`)),
      el("dl", { class: "facts" },
        el("dt", {}, "Copied"), el("dd", {}, `${bytes(r.copied)} of ${bytes(r.total)}`),
        el("dt", {}, "Speed"), el("dd", {}, (running ? mbps(r.bytes_per_second) : "–") + (r.rate_limit ? ` (limit ${mbps(r.rate_limit)})` : "")),
        el("dt", {}, "Time left"), el("dd", {}, running ? duration(r.eta_seconds) : "–"),
        r.error ? [el("dt", {}, "Error"), el("dd", { class: "error" }, r.error)] : null,
        r.config ? [el("dt", {}, "Config"), el("dd", {}, r.config)] : null),
      r.start && r.start.length ? attachBlock("Start it from its new home", r.start) : null);
  });
  $("relocations").replaceChildren(...rows);
}

$("relocate-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const name = $("relocate-mount").value;
  const rateText = $("relocate-rate").value.trim();
  const body = { to: $("relocate-to").value.trim() };
  if (rateText) body.rate = Math.round(parseFloat(rateText) * 1e6);
  act(`Starting the relocation of ${name}`,
    () => api("POST", `/v1/mounts/${encodeURIComponent(name)}/relocation`, body),
    (r) => `Relocating ${name} to ${r.dest}.`);
});

// ---- cache and chart -----------------------------------------------------------------------

function drawCache(s) {
  const c = s.cache;
  const f = s.fetches_in_flight;
  const rows = [
    ["Hit ratio", pct(s.hit_ratio) + ` (${c.hits} hits, ${c.misses} misses)`],
    ["Size", `${bytes(c.bytes)} of ${bytes(c.capacity)}`],
    ["Disk cache", c.disk ? `${bytes(c.disk.bytes)} of ${bytes(c.disk.capacity)}` : "off"],
    ["Fetches in flight", `${f.vm} VM reads, ${f.prestage} pre-staging, ${f.background} background`],
    ["Fetches waiting", String(s.fetches_waiting)],
  ];
  const sig = JSON.stringify(rows);
  if (sig === last.cache) return;
  last.cache = sig;
  $("cache").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, ...kids) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  for (const k of kids) e.append(k);
  return e;
}

// One small line chart per series; a gap where a point has no value.
function spark(title, points, value, fmt, fixedMax) {
  const W = 300, H = 60;
  const vals = points.map(value);
  const present = vals.filter((v) => v !== null && v !== undefined);
  const max = fixedMax || Math.max(1e-9, ...present);
  const n = Math.max(points.length - 1, 1);
  let d = "";
  let pen = false;
  vals.forEach((v, i) => {
    if (v === null || v === undefined) { pen = false; return; }
    const x = (i / n) * W, y = H - (v / max) * (H - 4) - 2;
    // A point alone (no neighbour with a value) still shows: a round cap on a tiny step.
    d += (pen ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1) + (pen ? " " : " l0.5 0 ");
    pen = true;
  });
  const now = present.length ? fmt(present[present.length - 1]) : "no data yet";
  const label = `${title}: now ${now}, highest ${present.length ? fmt(Math.max(...present)) : "–"}`;
  const g = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": label, preserveAspectRatio: "none" },
    svg("title", {}, label),
    svg("line", { x1: 0, y1: H - 1, x2: W, y2: H - 1, class: "axis" }),
    svg("path", { d: d.trim() || "M0 0", class: "series" }));
  return el("figure", { class: "spark" },
    el("figcaption", {}, el("span", {}, title), el("strong", {}, now)), g);
}

function drawChart(s) {
  const pts = s.history;
  const minutes = ((pts.length * s.interval_seconds) / 60).toFixed(1);
  $("chart").replaceChildren(
    spark("NFS read throughput", pts, (p) => p.read_bytes_per_second, mbps),
    spark("Fetch latency (missed chunks)", pts, (p) => p.fetch_latency_ms, (v) => v.toFixed(1) + " ms"),
    spark("Cache hit ratio", pts, (p) => p.hit_ratio, pct, 1),
    el("p", { class: "muted" }, `The last ${minutes} minutes, a point every ${s.interval_seconds} s.`));
}

// ---- snapshots -----------------------------------------------------------------------------

function drawSnapshots(c) {
  const sig = JSON.stringify(c);
  if (sig === last.snapshots) return;
  last.snapshots = sig;
  const out = [];
  if (c.vms.length === 0) out.push(el("p", { class: "muted" }, "The repository holds no snapshot yet."));
  for (const v of c.vms) {
    const p = v.profile;
    const forget = p ? el("button", { type: "button" }, "Forget boot profile") : null;
    if (forget) {
      forget.setAttribute("aria-label", `Forget the boot profile of ${v.vm}`);
      forget.addEventListener("click", () => act(`Forgetting the boot profile of ${v.vm}`,
        () => api("DELETE", `/v1/profiles/${encodeURIComponent(v.vm)}`),
        `Forgot the boot profile of ${v.vm}; its next boot learns a new one.`));
    }
    const rows = v.snapshots.map((s) => {
      const b = el("button", { type: "button" }, "Mount…");
      b.setAttribute("aria-label", `Mount ${s.name}`);
      b.addEventListener("click", () => {
        $("mount-snapshot").value = s.name;
        $("mount-name").focus();
        $("mount-section").scrollIntoView({ block: "start" });
      });
      return el("tr", {},
        el("td", {}, when(s.taken)),
        el("td", {}, bytes(s.size)),
        el("td", {}, s.disks.map((d) => `${d.name} (${bytes(d.size)})`).join(", ")),
        el("td", {}, b));
    });
    out.push(el("article", { class: "card vm", "data-vm": v.vm },
      el("div", { class: "vm-head" },
        el("h3", {}, v.vm),
        el("span", { class: "profile" }, p
          ? `boot profile: ${p.boots} boot${p.boots === 1 ? "" : "s"}, ${p.blocks} blocks (${bytes(p.bytes)})`
          : "no boot profile"),
        forget),
      rows.length === 0 ? el("p", { class: "muted" }, "No snapshot of this VM is left in the repository.") :
      el("div", { class: "scroll" },
        el("table", {},
          el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Taken"), el("th", { scope: "col" }, "Size"),
            el("th", { scope: "col" }, "Disks"), el("th", { scope: "col" }, el("span", { class: "offscreen" }, "Action")))),
          el("tbody", {}, rows)))));
  }
  for (const u of c.unreadable) out.push(el("p", { class: "error" }, "Unreadable snapshot " + u));
  $("snapshots").replaceChildren(...out);
}

$("mount-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const hosts = $("mount-hosts").value.split(",").map((h) => h.trim()).filter((h) => h);
  const body = {
    snapshot: $("mount-snapshot").value.trim(),
    read_only: $("mount-ro").checked,
    network: $("mount-network").value,
    prestage: $("mount-prestage").value,
    hosts,
  };
  const name = $("mount-name").value.trim();
  if (name) body.name = name;
  act(`Mounting ${body.snapshot}`, () => api("POST", "/v1/mounts", body),
    (r) => `Mounted ${r.mount.spec.snapshot_name} as ${r.mount.spec.name}; its attach instructions are under Live mounts.`)
    .then((ok) => { if (ok) $("mount-form").reset(); });
});

// ---- start ---------------------------------------------------------------------------------

(async () => {
  try {
    signedIn(await api("GET", "/v1/session"));
  } catch (e) {
    signedOut(e.status === 401 ? "" : "Cannot reach the server: " + e.message);
  }
})();
