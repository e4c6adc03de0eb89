// clproxy dashboard: plain JavaScript, no framework, no build step.
//
// It asks /dashboard/whoami whether it may look (else it shows the login form), then opens the
// live feed /dashboard/events (server-sent events): each "update" event carries the whole state
// (accounts, keys, proxy figures, the last hour's traffic) and the requests that finished since
// the previous one ("full": the whole list). Rows are kept and updated in place, keyed by name or
// request id, so focus and opened rows survive updates. The stable hooks (data-testid, data-state,
// aria-valuenow, ...) are the interface tests outside the project use: keep them as they are.
"use strict";

(function () {
  const MAX_REQUESTS = 200;
  const SVG = "http://www.w3.org/2000/svg";
  let offset = 0;            // server clock minus ours, in seconds
  let requests = [];         // newest first
  const opened = new Set();  // request ids whose attempts are shown
  let source = null;

  const $ = (selector) => document.querySelector(selector);

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined) continue;
      if (name === "text") node.textContent = value;
      else if (name === "className") node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children || []) node.append(child);
    return node;
  }

  function serverNow() { return Date.now() / 1000 + offset; }

  // --- formatting -------------------------------------------------------------------------------

  function duration(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    const d = Math.floor(seconds / 86400), h = Math.floor(seconds % 86400 / 3600);
    const m = Math.floor(seconds % 3600 / 60), s = seconds % 60;
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${String(s).padStart(2, "0")}s`;
    return `${s}s`;
  }
  function clock(epoch) {
    if (epoch === null || epoch === undefined) return "—";
    return new Date(epoch * 1000).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit", second: "2-digit"});
  }
  function number(value) { return value === null || value === undefined ? "—" : Number(value).toLocaleString(); }
  function usd(value) { return value === null || value === undefined ? "—" : `$${Number(value).toFixed(2)}`; }
  function ms(value) {
    if (value === null || value === undefined) return "—";
    return value >= 1000 ? `${(value / 1000).toFixed(1)} s` : `${Math.round(value)} ms`;
  }
  function percentOf(ratio) { return ratio === null || ratio === undefined ? "—" : `${Math.round(ratio * 100)}%`; }

  // --- keyed rows -------------------------------------------------------------------------------

  // Make tbody's rows those of items, in order, reusing each existing row with the same key
  // (the tbody holds only keyed rows when this runs).
  function sync(tbody, items, keyOf, create, update) {
    const existing = new Map();
    for (const row of Array.from(tbody.children)) existing.set(row.dataset.rowKey, row);
    let cursor = tbody.firstElementChild;
    for (const item of items) {
      const key = keyOf(item);
      let row = existing.get(key);
      if (row) existing.delete(key); else { row = create(item); row.dataset.rowKey = key; }
      update(row, item);
      if (row !== cursor) tbody.insertBefore(row, cursor); else cursor = cursor.nextElementSibling;
    }
    for (const row of existing.values()) row.remove();
  }

  function cell(row, index) { return row.children[index]; }

  // --- accounts ---------------------------------------------------------------------------------

  function meter(label, testid) {
    return el("div", {"data-testid": testid, className: "meter", role: "progressbar", "aria-label": label,
                      "aria-valuemin": "0", "aria-valuemax": "100"}, [el("span")]);
  }

  function setMeter(node, window, label) {
    const bar = node.firstElementChild;
    const text = node.nextElementSibling;
    if (!window) {
      node.removeAttribute("aria-valuenow");
      node.setAttribute("aria-valuetext", "unknown");
      node.removeAttribute("data-level");
      bar.style.width = "0";
      text.textContent = "unknown";
      return;
    }
    const value = window.percent;
    node.setAttribute("aria-valuenow", String(value));
    node.setAttribute("aria-valuetext", `${value}% used`);
    node.dataset.level = value >= 95 ? "full" : value >= 80 ? "warn" : "ok";
    bar.style.width = `${value}%`;
    text.textContent = window.reset ? `${value}% · resets ${clock(window.reset)}` : `${value}%`;
    node.title = `${label}: ${text.textContent}`;
  }

  function createAccount(account) {
    const row = el("tr", {"data-testid": "account-row", "data-account": account.name});
    row.append(
      el("td", {}, [el("strong", {className: "name"}), el("span", {className: "sub kind"})]),
      el("td", {}, [el("span", {className: "state"}), el("span", {className: "sub countdown"}),
                    el("span", {className: "sub backoff"})]),
      el("td", {}, [meter(`${account.name} 5-hour window used`, "quota-5h"), el("span", {className: "sub"})]),
      el("td", {}, [meter(`${account.name} 7-day window used`, "quota-7d"), el("span", {className: "sub"})]),
      el("td"), el("td"), el("td"), el("td"), el("td", {className: "wrap"}));
    return row;
  }

  function updateAccount(row, account) {
    row.querySelector(".name").textContent = account.name;
    row.querySelector(".kind").textContent = account.kind || "";
    row.dataset.coolingUntil = account.coolingUntil === null ? "" : String(account.coolingUntil);
    row.dataset.serverState = account.state;
    row.querySelector(".backoff").textContent = account.backoffLevel ? `backoff level ${account.backoffLevel}` : "";
    setMeter(row.querySelector("[data-testid=quota-5h]"), account.quota["5h"], "5-hour window");
    setMeter(row.querySelector("[data-testid=quota-7d]"), account.quota["7d"], "7-day window");
    cell(row, 4).textContent = `${number(account.attempts)} / ${number(account.errors)} / ${number(account.rateLimits)}`;
    cell(row, 5).textContent = percentOf(account.cacheHitRatio);
    cell(row, 6).textContent = number(account.inFlight);
    cell(row, 7).textContent = number(account.sessions);
    const problem = account.state === "disabled" && account.disabledReason ? account.disabledReason : account.lastError;
    cell(row, 8).textContent = problem ? (account.lastErrorAt ? `${problem} (${clock(account.lastErrorAt)})` : problem) : "—";
    showState(row);
  }

  // The state and countdown as of now: a cooldown ends here when it ends, not at the next update.
  function showState(row) {
    let state = row.dataset.serverState;
    const until = row.dataset.coolingUntil ? Number(row.dataset.coolingUntil) : null;
    const left = until === null ? 0 : until - serverNow();
    if (state === "cooling" && left <= 0) state = "ok";
    if (row.dataset.state !== state) row.dataset.state = state;
    row.querySelector(".state").textContent = state;
    row.querySelector(".countdown").textContent = state === "cooling" ? `for ${duration(left)}` : "";
  }

  // --- proxy, keys ------------------------------------------------------------------------------

  function showProxy(proxy, accounts) {
    const chain = (proxy.fallbackChain || []).map((t) => `${t.provider}:${t.model}`).join(" → ") || "none";
    const cooling = accounts.filter((a) => a.state === "cooling").length;
    const facts = [
      ["Version", proxy.version], ["Uptime", duration(proxy.uptime || 0)], ["Strategy", proxy.strategy],
      ["Fallback chain", chain], ["Attempts / completed", `${number(proxy.attempts)} / ${number(proxy.completed)}`],
      ["Truncated streams", number(proxy.truncated)], ["Session moves", number(proxy.sessionMoves)],
      ["Queue", number(proxy.queueLength)], ["In flight", number(proxy.inFlight)],
      ["Accounts", `${accounts.length} (${cooling} cooling)`],
    ];
    const list = $("#proxy");
    list.replaceChildren(...facts.map(([name, value]) =>
      el("div", {}, [el("dt", {text: name}), el("dd", {text: value === undefined || value === null ? "—" : String(value)})])));
  }

  function limitText(used, limit, format) {
    return limit === null || limit === undefined ? format(used) : `${format(used)} of ${format(limit)}`;
  }

  function showKeys(keys) {
    $("#keys-section").hidden = keys.length === 0;
    sync($("#keys tbody"), keys, (k) => k.name,
      (k) => el("tr", {"data-testid": "key-row", "data-key": k.name}, [el("th", {scope: "row"}), el("td"), el("td"), el("td"), el("td")]),
      (row, k) => {
        const limits = k.limits || {}, today = k.today || {}, month = k.month || {};
        cell(row, 0).textContent = k.admin ? `${k.name} (admin)` : k.name;
        cell(row, 1).textContent = limitText(today.tokens || 0, limits.tokens_per_day, number);
        cell(row, 2).textContent = limitText(today.usd || 0, limits.usd_per_day, usd);
        cell(row, 3).textContent = limitText(month.usd || 0, limits.usd_per_month, usd);
        cell(row, 4).textContent = limits.rpm ? `limit ${number(limits.rpm)}` : "no limit";
      });
  }

  // --- requests ---------------------------------------------------------------------------------

  function createRequest(r) {
    const toggle = el("button", {type: "button", className: "link", "aria-expanded": "false"});
    toggle.addEventListener("click", () => {
      if (opened.has(r.id)) opened.delete(r.id); else opened.add(r.id);
      showAttempts(toggle.closest("tr"), r);
    });
    return el("tr", {"data-testid": "request-row"}, [
      el("td"), el("td"), el("td"), el("td"), el("td", {className: "status"}), el("td"), el("td"), el("td", {}, [toggle])]);
  }

  function updateRequest(row, r) {
    row.dataset.status = String(r.status);
    row.dataset.account = r.account || "";
    row.dataset.model = r.model || "";
    row.dataset.requestId = r.id;
    cell(row, 0).textContent = clock(r.at);
    cell(row, 1).textContent = r.key || "—";
    cell(row, 2).textContent = r.model || "—";
    cell(row, 3).textContent = r.account || "—";
    cell(row, 4).textContent = r.truncated ? `${r.status} (cut short)` : String(r.status);
    cell(row, 4).title = r.error || "";
    cell(row, 5).textContent = ms(r.durationMs);
    const tokens = r.tokens || {};
    cell(row, 6).textContent = `${number(tokens.input)} / ${number(tokens.output)}`;
    const attempts = (r.attempts || []).length;
    const toggle = row.querySelector("button");
    toggle.textContent = `${attempts} attempt${attempts === 1 ? "" : "s"}`;
    toggle.setAttribute("aria-label", `${attempts} attempts of request ${r.id}: show or hide`);
  }

  function showAttempts(row, r) {
    const open = opened.has(r.id);
    const toggle = row.querySelector("button");
    toggle.setAttribute("aria-expanded", String(open));
    let detail = row.nextElementSibling;
    if (detail && detail.dataset.follows !== r.id) detail = null;
    if (!open) { if (detail) detail.remove(); return; }
    if (detail) return;
    const items = (r.attempts || []).map((a, i) => el("li", {
      text: `${i + 1}. ${a.account || a.provider} → ${a.status === null ? "no answer" : a.status} ` +
            `${a.classification} (${ms(a.durationMs)})`}));
    const lines = [el("ol", {}, items)];
    if (r.error) lines.push(el("p", {text: `Error: ${r.error}`}));
    if (r.requestedModel && r.requestedModel !== r.model) lines.push(el("p", {text: `Requested model: ${r.requestedModel}`}));
    detail = el("tr", {className: "attempts"}, [el("td", {colspan: "8"}, lines)]);
    detail.dataset.follows = r.id;
    row.after(detail);
  }

  function showRequests() {
    const tbody = $("#requests tbody");
    // the opened attempts are put back after the rows are in order (focus stays on the buttons)
    for (const detail of Array.from(tbody.querySelectorAll("tr.attempts"))) detail.remove();
    sync(tbody, requests, (r) => r.id, createRequest, updateRequest);
    for (const row of Array.from(tbody.querySelectorAll("tr[data-testid=request-row]"))) {
      const r = requests.find((x) => x.id === row.dataset.requestId);
      if (r && opened.has(r.id)) showAttempts(row, r);
    }
    $("#no-requests").hidden = requests.length > 0;
  }

  // --- traffic chart ----------------------------------------------------------------------------

  function svg(tag, attrs) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
    return node;
  }

  function showTraffic(series) {
    // drawn at the container's own width, so text is never stretched
    const width = Math.max(280, Math.round($("#traffic").clientWidth || 600));
    const height = 180, left = 34, right = 48, top = 8, bottom = 20;
    const plotW = width - left - right, plotH = height - top - bottom;
    const n = series.length || 1, step = plotW / n;
    const maxCount = Math.max(1, ...series.map((m) => m.requests), ...series.map((m) => m.rateLimited));
    const latencies = series.map((m) => m.p95Ms || 0);
    const maxLatency = Math.max(1, ...latencies);
    const totals = series.reduce((t, m) => ({requests: t.requests + m.requests, errors: t.errors + m.errors,
                                            limited: t.limited + m.rateLimited}), {requests: 0, errors: 0, limited: 0});
    const chart = svg("svg", {viewBox: `0 0 ${width} ${height}`,
                              "data-testid": "traffic-chart", role: "img",
                              "aria-label": `Requests per minute over the last hour: ${totals.requests} requests, ` +
                                            `${totals.errors} errors, ${totals.limited} 429s`});
    chart.dataset.requests = String(totals.requests);
    chart.dataset.errors = String(totals.errors);
    chart.dataset.rateLimited = String(totals.limited);
    chart.append(svg("line", {class: "axis", x1: left, y1: top + plotH, x2: left + plotW, y2: top + plotH}));
    const label = (x, y, text, anchor) => { const t = svg("text", {x, y, "text-anchor": anchor}); t.textContent = text; chart.append(t); };
    label(left - 4, top + 8, String(maxCount), "end");
    label(left - 4, top + plotH, "0", "end");
    if (Math.max(0, ...latencies) > 0) label(left + plotW + 4, top + 8, ms(maxLatency), "start");
    label(left, height - 4, "-60 min", "start");
    label(left + plotW, height - 4, "now", "end");
    const y = (count) => top + plotH - (count / maxCount) * plotH;
    series.forEach((m, i) => {
      const x = left + i * step;
      const bar = (count, cls, inset) => {
        if (!count) return;
        chart.append(svg("rect", {class: cls, x: x + inset, y: y(count), width: Math.max(1, step - 2 * inset), height: top + plotH - y(count)}));
      };
      bar(m.requests, "bar-requests", 0.5);
      bar(m.errors, "bar-errors", step / 4);
      bar(m.rateLimited, "bar-limited", step / 3);
    });
    for (const [field, cls] of [["p50Ms", "line-p50"], ["p95Ms", "line-p95"]]) {
      const points = series.map((m, i) => m[field] === null ? null :
        [left + (i + 0.5) * step, top + plotH - (m[field] / maxLatency) * plotH]).filter(Boolean);
      if (points.length > 1) {
        chart.append(svg("polyline", {class: cls, points: points.map(([x, yy]) => `${x.toFixed(1)},${yy.toFixed(1)}`).join(" ")}));
      }
      // a dot per minute too: a lone minute with traffic has no line to draw
      for (const [x, yy] of points) chart.append(svg("circle", {class: cls + " dot", cx: x.toFixed(1), cy: yy.toFixed(1), r: 2}));
    }
    $("#traffic").replaceChildren(chart);
  }

  // --- the feed ---------------------------------------------------------------------------------

  function apply(message) {
    const state = message.state;
    offset = state.now - Date.now() / 1000;
    const incoming = message.requests || [];
    if (message.full) requests = incoming.slice(0, MAX_REQUESTS);
    else if (incoming.length) requests = incoming.concat(requests).slice(0, MAX_REQUESTS);
    showProxy(state.proxy, state.accounts);
    sync($("#accounts tbody"), state.accounts, (a) => a.name, createAccount, updateAccount);
    $("#no-accounts").hidden = state.accounts.length > 0;
    showKeys(state.keys || []);
    showTraffic(state.traffic || []);
    showRequests();
  }

  function setConnection(text) { $("#connection").textContent = text; }

  function connect() {
    if (source) source.close();
    source = new EventSource("/dashboard/events");
    source.addEventListener("update", (event) => {
      apply(JSON.parse(event.data));
      setConnection(`live · updated ${clock(serverNow())}`);
    });
    source.addEventListener("open", () => setConnection("live"));
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED) {
        // refused (a session that expired, a key revoked): ask again what we may see
        setConnection("disconnected");
        setTimeout(start, 2000);
      } else {
        setConnection("reconnecting…");
      }
    });
  }

  async function whoami() {
    const answer = await fetch("/dashboard/whoami", {credentials: "same-origin", cache: "no-store"});
    if (!answer.ok) throw new Error(`whoami answered ${answer.status}`);
    return answer.json();
  }

  async function start() {
    let who;
    try {
      who = await whoami();
    } catch (error) {
      setConnection("the proxy does not answer; retrying…");
      setTimeout(start, 3000);
      return;
    }
    $("#logout").hidden = !who.session;
    if (!who.authenticated) {
      if (source) { source.close(); source = null; }
      $("#board").hidden = true;
      $("#login").hidden = false;
      setConnection(who.loginPossible ? "log in to see the pool" : "no admin key exists");
      $("#login-key").focus();
      return;
    }
    $("#login").hidden = true;
    $("#board").hidden = false;
    connect();
  }

  async function login(event) {
    event.preventDefault();
    const input = $("#login-key"), error = $("#login-error");
    error.textContent = "";
    let answer;
    try {
      answer = await fetch("/dashboard/login", {
        method: "POST", credentials: "same-origin", cache: "no-store",
        headers: {"content-type": "application/json", "x-clproxy-dashboard": "1"},
        body: JSON.stringify({key: input.value}),
      });
    } catch (e) {
      error.textContent = "the proxy does not answer";
      return;
    }
    input.value = "";  // never kept in the page
    if (answer.ok) { start(); return; }
    let message = `login failed (${answer.status})`;
    try { message = (await answer.json()).error.message; } catch (e) { /* keep the status line */ }
    error.textContent = message;
    input.focus();
  }

  async function logout() {
    await fetch("/dashboard/logout", {method: "POST", credentials: "same-origin",
                                      headers: {"x-clproxy-dashboard": "1"}});
    if (source) { source.close(); source = null; }
    start();
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("#login-form").addEventListener("submit", login);
    $("#logout").addEventListener("click", logout);
    setInterval(() => { for (const row of document.querySelectorAll("tr[data-testid=account-row]")) showState(row); }, 250);
    start();
  });
})();
