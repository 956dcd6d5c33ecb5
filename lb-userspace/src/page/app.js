// lb's status page: reads /live.json every second and /trend.json every five, and draws them.
// Everything is built with DOM calls and textContent (never innerHTML), so no name or address
// from the config can become markup.
"use strict";

const LIVE_EVERY_MS = 1000;
const TREND_EVERY_MS = 5000;
const COLORS = ["#3465a4", "#e08a00", "#1b8a3a", "#c62828", "#75507b", "#06989a", "#8f5902", "#555753", "#ce5c00", "#4e9a06"];
const SVG = "http://www.w3.org/2000/svg";

let trend = { every_secs: 5, points: [] };
let lastLive = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
}

function endpoint(addr, port) {
  return addr.includes(":") ? `[${addr}]:${port}` : `${addr}:${port}`;
}

function num(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(1) + "G";
  if (n >= 1e6) return (n / 1e6).toFixed(1) + "M";
  if (n >= 1e4) return (n / 1e3).toFixed(1) + "k";
  return String(n);
}

function rate(x) {
  return x >= 100 ? x.toFixed(0) : x.toFixed(1);
}

function ago(rfc3339) {
  const t = Date.parse(rfc3339);
  if (isNaN(t)) return rfc3339;
  let s = Math.max(0, Math.round((Date.now() - t) / 1000));
  if (s < 120) return `${s}s ago`;
  const m = Math.round(s / 60);
  if (m < 120) return `${m}m ago`;
  const h = Math.round(m / 60);
  return h < 48 ? `${h}h ago` : `${Math.round(h / 24)}d ago`;
}

function clock(rfc3339) {
  const d = new Date(rfc3339);
  return isNaN(d) ? rfc3339 : d.toLocaleTimeString([], { hour12: false });
}

// A small line (or bar) chart of series [{name, color, values: [[t_ms, v], ...]}] over the
// trend's window.
function chart(key, title, series, bars) {
  const W = 270, H = 90, PAD = 4;
  const box = el("div", { class: "chart", "data-chart": key });
  box.append(el("h3", {}, title));
  const s = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  const all = series.flatMap((x) => x.values);
  if (all.length === 0) {
    const t = svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#999", "font-size": 11 });
    t.textContent = "collecting (a point every few seconds)";
    s.append(t);
    box.append(s);
    return box;
  }
  const t0 = Math.min(...all.map((p) => p[0]));
  const t1 = Math.max(...all.map((p) => p[0]), t0 + 1);
  const top = Math.max(...all.map((p) => p[1]));
  box.dataset.max = String(top);
  box.dataset.sum = String(series.reduce((a, x) => a + x.values.reduce((b, p) => b + p[1], 0), 0));
  const max = Math.max(top, bars ? 1 : 0.0001);
  const x = (t) => PAD + ((t - t0) / (t1 - t0)) * (W - 2 * PAD);
  const y = (v) => H - PAD - (v / max) * (H - 2 * PAD - 12);
  const grid = svg("line", { x1: 0, x2: W, y1: y(max), y2: y(max), stroke: "#eee" });
  s.append(grid);
  const label = svg("text", { x: W - 3, y: 10, "text-anchor": "end", fill: "#777", "font-size": 10 });
  label.textContent = `max ${rate(max)}`;
  s.append(label);
  for (const ser of series) {
    if (bars) {
      const w = Math.max(1, (W - 2 * PAD) / Math.max(ser.values.length, 1) - 1);
      for (const [t, v] of ser.values) {
        if (v <= 0) continue;
        s.append(svg("rect", { x: x(t) - w / 2, y: y(v), width: w, height: H - PAD - y(v), fill: ser.color }));
      }
    } else {
      const pts = ser.values.map(([t, v]) => `${x(t).toFixed(1)},${y(v).toFixed(1)}`).join(" ");
      s.append(svg("polyline", { points: pts, fill: "none", stroke: ser.color, "stroke-width": 1.6 }));
    }
  }
  box.append(s);
  const legend = el("div", { class: "legend" });
  for (const ser of series) {
    const sw = el("i");
    sw.style.background = ser.color;
    const last = ser.values.length ? ser.values[ser.values.length - 1][1] : 0;
    legend.append(el("span", { "data-series": ser.name, "data-last": String(last) }, sw, `${ser.name} ${rate(last)}`));
  }
  box.append(legend);
  return box;
}

function charts(svc) {
  const names = svc.backends.map((b) => endpoint(b.address, b.port));
  const color = (i) => COLORS[i % COLORS.length];
  const per = (field) =>
    names.map((n, i) => ({
      name: n,
      color: color(i),
      values: trend.points.filter((p) => p.services[svc.name] && p.services[svc.name].backends[n]).map((p) => [p.at_ms, p.services[svc.name].backends[n][field]]),
    }));
  const every = Math.round(trend.every_secs || 5);
  const moves = [{
    name: "moves",
    color: COLORS[3],
    values: trend.points.filter((p) => p.services[svc.name]).map((p) => [p.at_ms, p.services[svc.name].moves]),
  }];
  return el(
    "div",
    { class: "charts" },
    chart("pinned", "pinned clients", per("pinned")),
    chart("new-pins", "new pins/s", per("new_pins_per_sec")),
    chart("packets", "packets/s", per("packets_per_sec")),
    chart("moves", `client moves per ${every} s`, moves, true),
  );
}

function backendRow(svc, b) {
  const name = endpoint(b.address, b.port);
  const state = b.differs_from_config ? `${b.state}*` : b.state;
  const why = b.differs_from_config ? `${b.reason} (${b.differs_from_config})` : b.reason;
  return el(
    "tr",
    { class: `backend ${b.state}`, "data-service": svc.name, "data-backend": name },
    el("td", { class: "name" }, name),
    el("td", { class: "state" }, state),
    el("td", { class: "weight" }, b.weight),
    el("td", { class: "slots" }, b.slots),
    el("td", { class: "pinned" }, num(b.pinned)),
    el("td", { class: "new-pins" }, rate(b.new_pins_per_sec)),
    el("td", { class: "moves" }, b.moves_per_min),
    el("td", {}, num(b.counters.packets)),
    el("td", {}, num(b.counters.conns)),
    el("td", { class: "since", title: b.since }, ago(b.since)),
    el("td", { class: "reason" }, why),
  );
}

function service(svc) {
  const sec = el("section", { class: "service", "data-service": svc.name });
  const moves = Object.entries(svc.moves || {}).map(([r, n]) => `${r} ${n}`).join(", ") || "none";
  sec.append(
    el(
      "h2",
      {},
      `${svc.name} `,
      el("small", {}, `${endpoint(svc.vip, svc.port)}/${svc.protocol} · affinity ${svc.affinity_timeout} · health ${svc.health} · pinned ${num(svc.pinned)} · ${rate(svc.new_pins_per_sec)} new pins/s · `),
      el("small", { class: "service-moves" }, `${svc.moves_per_min} moves/min`),
      el("small", {}, ` · moves so far: ${moves}`),
    ),
  );
  if (svc.fail_open) sec.append(el("div", { class: "failopen" }, "Every backend is down: failing open (routing as if all were up)"));
  sec.append(charts(svc));
  const head = el(
    "tr",
    {},
    ...["backend", "state", "weight", "slots", "pins", "new pins/s", "moves/min", "packets", "connections", "since", "reason"].map((h) =>
      el("th", { class: h === "since" || h === "reason" ? "text" : "" }, h),
    ),
  );
  sec.append(el("table", { class: "backends" }, el("thead", {}, head), el("tbody", {}, ...svc.backends.map((b) => backendRow(svc, b)))));
  return sec;
}

function render() {
  const live = lastLive;
  if (!live) return;
  const st = live.status;
  const fill = st.affinity_capacity ? ((100 * st.affinity_entries) / st.affinity_capacity).toFixed(1) : "0";
  document.getElementById("summary").textContent =
    `${st.version} · pid ${st.pid} · ${st.mode} · started ${ago(st.started)} · ${st.config} · affinity table ${num(st.affinity_entries)} of ${num(st.affinity_capacity)} (${fill} %)` +
    ` · ${st.interfaces.map((i) => `${i.name} (${i.mode})`).join(", ")}`;
  const w = document.getElementById("warnings");
  w.hidden = st.warnings.length === 0;
  document.getElementById("warning-list").replaceChildren(...st.warnings.map((x) => el("li", {}, x)));
  document.getElementById("services").replaceChildren(...st.services.map(service));
  const rows = live.recent_moves.map((m) =>
    el(
      "tr",
      { class: "move", "data-reason": m.reason },
      el("td", { title: m.time }, clock(m.time)),
      el("td", {}, m.service),
      el("td", { class: "client" }, m.client),
      el("td", { class: "from" }, m.from),
      el("td", { class: "to" }, m.to),
      el("td", { class: "reason" }, m.reason),
    ),
  );
  document.querySelector("#moves tbody").replaceChildren(...rows);
  document.getElementById("moves").hidden = rows.length === 0;
  document.getElementById("no-moves").hidden = rows.length !== 0;
  document.body.dataset.updated = String(Date.now());
}

function linkState(ok, why) {
  const l = document.getElementById("link");
  l.className = ok ? "link live" : "link stale";
  l.textContent = ok ? `live · ${new Date().toLocaleTimeString([], { hour12: false })}` : `not updating: ${why}`;
}

async function get(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error(`${path}: ${r.status} ${(await r.text()).trim()}`);
  return r.json();
}

async function pollLive() {
  try {
    lastLive = await get("/live.json");
    render();
    linkState(true);
  } catch (e) {
    linkState(false, e.message);
  }
  setTimeout(pollLive, LIVE_EVERY_MS);
}

async function pollTrend() {
  try {
    trend = await get("/trend.json");
    render();
  } catch (e) {
    // The live poll says when lb is unreachable.
  }
  setTimeout(pollTrend, TREND_EVERY_MS);
}

pollTrend();
pollLive();
