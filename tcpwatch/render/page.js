"use strict";
// The live page of tcpwatch serve: renders the JSON API's answers and polls them every poll
// interval. Every string from the host is inserted with textContent, never as markup.
(function () {
  const data = JSON.parse(document.getElementById("tw-data").textContent);
  const STATES = data.states;
  let snapshot = data.snapshot;
  let findings = data.findings;
  let netns = data.netns;
  let chosen = null;
  let failures = 0;
  const SVG = "http://www.w3.org/2000/svg";

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }
  function owner(item) {
    return item.process === null ? "unknown" : item.process + "[" + item.pid + "]";
  }
  function current() {
    if (!snapshot) return null;
    return snapshot.namespaces.find((ns) => ns.netns === netns) || snapshot.namespaces[0] || null;
  }
  function worst(list) {
    if (list.some((f) => f.severity === "critical")) return "critical";
    if (list.some((f) => f.severity === "warning")) return "warning";
    return list.length ? "info" : "";
  }
  function findingsOf(state) {
    if (!findings) return [];
    return findings.findings.filter((f) => STATES[state].rules.includes(f.id));
  }

  function renderSelector() {
    const select = document.getElementById("netns");
    const names = snapshot ? snapshot.netns_names : [];
    select.replaceChildren(...names.map((name) => {
      const option = el("option", { value: name }, name);
      if (name === netns) option.selected = true;
      return option;
    }));
    document.getElementById("netns-choice").hidden = names.length < 2;
  }

  function renderDiagram(ns) {
    for (const state of Object.keys(STATES)) {
      const group = document.getElementById("state-" + state);
      const counts = ns && ns.states;
      for (const node of group.querySelectorAll("[data-family]")) {
        const family = node.getAttribute("data-family");
        node.textContent = counts ? String(counts[family][state]) : "?";
      }
      const level = worst(findingsOf(state));
      group.classList.toggle("critical", level === "critical");
      group.classList.toggle("warning", level === "warning");
      group.classList.toggle("busy", !!counts && counts.total[state] > 0);
      group.classList.toggle("selected", state === chosen);
    }
  }

  function sparkline(values) {
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", "0 0 200 60");
    svg.setAttribute("preserveAspectRatio", "none");
    const top = Math.max(1, ...values);
    const step = values.length > 1 ? 200 / (values.length - 1) : 0;
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", values.map((v, i) => (i * step).toFixed(1) + "," +
      (58 - (v / top) * 54).toFixed(1)).join(" "));
    svg.append(line);
    return svg;
  }

  function renderDetail(ns) {
    const aside = document.getElementById("detail");
    if (!chosen) return;
    const info = STATES[chosen];
    const history = ns ? ns.history.states[chosen] : [];
    const related = findingsOf(chosen);
    const now = ns && ns.states ? ns.states.total[chosen] : "?";
    aside.replaceChildren(
      el("h3", {}, info.label + ": " + now),
      el("p", { class: "meaning" }, info.meaning),
      el("p", { class: "note" }, "last " + history.length + " polls (max " +
        Math.max(0, ...history) + ")"),
      sparkline(history),
      el("h3", {}, "Related findings"),
      related.length ? el("ul", {}, ...related.map((f) => el("li", { class: f.severity },
        f.severity + " " + f.id + ": " + f.title))) : el("p", { class: "note" }, "none"),
    );
  }

  function bar(ratio, level) {
    const fill = el("span", { class: level, style: "width:" + Math.min(100, ratio * 100).toFixed(1) + "%" });
    return el("div", { class: "bar" }, fill);
  }

  function renderTables(ns) {
    const listeners = ns && ns.listeners ? ns.listeners : { items: [], total: 0 };
    document.querySelector("#listeners tbody").replaceChildren(...listeners.items.map((l) => {
      const level = l.fill_ratio >= 1 ? "critical" : l.fill_ratio >= 0.8 ? "warning" : "";
      return el("tr", { class: "listener" },
        el("td", { class: "endpoint" }, l.endpoint + (l.socket ? " #" + l.socket : "")),
        el("td", { class: "owner" }, owner(l)),
        el("td", { class: "num queue" }, l.queue_length + " / " + l.queue_max),
        el("td", {}, bar(l.fill_ratio, level)),
        el("td", { class: "num" }, String(l.syn_recv)));
    }));
    document.getElementById("listeners-more").textContent = listeners.total > listeners.items.length
      ? "showing " + listeners.items.length + " of " + listeners.total + " listeners" : "";
    const holders = ns && ns.close_wait_holders ? ns.close_wait_holders : [];
    document.querySelector("#holders tbody").replaceChildren(...holders.map((h) =>
      el("tr", {}, el("td", {}, owner(h)), el("td", { class: "num" }, String(h.sockets)))));
    const destinations = ns && ns.destinations ? ns.destinations.items : [];
    document.querySelector("#destinations tbody").replaceChildren(...destinations.map((d) =>
      el("tr", {}, el("td", {}, d.source + " → " + d.destination),
        el("td", { class: "num" }, String(d.sockets)), el("td", { class: "num" }, String(d.time_wait)),
        el("td", {}, d.fill_ratio === null ? "" : bar(d.fill_ratio, d.fill_ratio > 0.8 ? "critical" : "")))));
    renderSlowPeers(ns && ns.slow_peers ? ns.slow_peers : []);
  }

  function share(value) {
    return value === null || value === undefined ? "-" : (value * 100).toFixed(0) + "%";
  }

  function size(bytes) {
    return bytes < 1024 ? bytes + " B" : bytes < 1048576 ? (bytes / 1024).toFixed(1) + " KiB"
      : (bytes / 1048576).toFixed(1) + " MiB";
  }

  // Who is slow: each peer's live connections, what they wait on (docs/connections.md).
  function renderSlowPeers(peers) {
    document.querySelector("#slow-peers tbody").replaceChildren(...peers.map((p) =>
      el("tr", { class: p.waiting_on ? "waiting" : "" },
        el("td", {}, (p.direction === "inbound" ? "clients of " : "to ") + p.peer),
        el("td", { class: "owner" }, owner(p)),
        el("td", { class: p.waiting_on ? "warning" : "" }, p.waiting_on || "-"),
        el("td", { class: "num" }, String(p.connections)),
        el("td", { class: "num" }, share(p.rwnd_limited_share)),
        el("td", { class: "num" }, share(p.sndbuf_limited_share)),
        el("td", { class: "num" }, String(p.zero_window)),
        el("td", { class: "num" }, size(p.send_queue_bytes)),
        el("td", { class: "num" }, size(p.receive_queue_bytes)),
        el("td", { class: "num" }, share(p.retransmission_ratio)))));
    document.getElementById("slow-peers-none").textContent = peers.length
      ? "" : "no live connection scanned yet";
  }

  function renderFindings() {
    const box = document.getElementById("findings");
    const list = findings ? findings.findings : [];
    const summary = document.getElementById("summary");
    const counts = findings ? findings.summary : { critical: 0, warning: 0, info: 0 };
    summary.replaceChildren(
      el("span", { class: "badge " + (findings ? findings.status.toLowerCase() : "") },
        findings ? findings.status : "no poll yet"),
      ...["critical", "warning", "info"].filter((s) => counts[s])
        .map((s) => el("span", { class: "badge " + s }, counts[s] + " " + s)));
    if (!list.length) {
      box.replaceChildren(el("p", {}, "No active findings: TCP looks healthy."));
      return;
    }
    box.replaceChildren(...list.map((f) => el("div", { class: "finding " + f.severity },
      el("div", { class: "title" }, f.severity.toUpperCase() + " " + f.id + " " + f.slug + ": " + f.title),
      el("div", { class: "meta" }, "netns " + f.netns + (f.subject ? " · " + f.subject : "")),
      el("pre", { class: "evidence" }, Object.entries(f.evidence).map(([k, v]) => k + "  " + v).join("\n")),
      f.remediation ? el("pre", { class: "fix" }, f.remediation) : "",
      el("div", { class: "meta" }, el("a", { href: f.doc_url || "rules/" + f.id }, f.doc)))));
  }

  function renderSources(ns) {
    const failed = ns ? ns.sources.filter((s) => !s.ok) : [];
    const degraded = ns ? ns.sources.filter((s) => s.ok && s.skipped.length) : [];
    document.getElementById("sources").replaceChildren(...failed.map((s) =>
      el("li", { class: "source-failed" }, "source " + s.name + " failed in " + ns.netns + ": " +
        (s.error || "unknown error") + " (rules that need it were skipped)")),
      ...degraded.map((s) => el("li", { class: "source-degraded" }, "source " + s.name +
        " left out in " + ns.netns + ": " + s.skipped.join("; "))));
  }

  function render() {
    const ns = current();
    renderSources(ns);
    renderSelector();
    renderDiagram(ns);
    renderDetail(ns);
    renderTables(ns);
    renderFindings();
    const status = document.getElementById("status");
    if (snapshot) {
      const age = Math.max(0, Date.now() / 1000 - snapshot.last_poll);
      status.textContent = "latest poll " + age.toFixed(0) + " s ago" +
        (failures ? " · update failed " + failures + "×" : "");
      status.classList.toggle("stale", failures > 0 || age > 3 * Math.max(data.interval, 1));
    }
    document.body.setAttribute("data-updated", String(snapshot ? snapshot.last_poll : 0));
  }

  async function fetchJson(path) {
    // location.origin carries no user:password; the browser adds the credentials it used for
    // the page (basic auth) to same-origin requests.
    const response = await fetch(location.origin + path, { credentials: "same-origin", cache: "no-store" });
    if (!response.ok) throw new Error(path + ": " + response.status);
    return response.json();
  }

  async function refresh() {
    const query = netns ? "?netns=" + encodeURIComponent(netns) : "";
    try {
      const [nextSnapshot, nextFindings] = await Promise.all([
        fetchJson("/api/v1/snapshot" + query), fetchJson("/api/v1/findings" + query)]);
      snapshot = nextSnapshot;
      findings = nextFindings;
      if (netns === null && snapshot.namespaces.length) netns = snapshot.namespaces[0].netns;
      failures = 0;
    } catch (error) {
      failures += 1;
    }
    render();
  }

  document.getElementById("netns").addEventListener("change", (event) => {
    netns = event.target.value;
    refresh();
  });
  for (const group of document.querySelectorAll(".state")) {
    const choose = () => { chosen = group.getAttribute("data-state"); render(); };
    group.addEventListener("click", choose);
    group.addEventListener("keydown", (event) => { if (event.key === "Enter") choose(); });
  }
  render();
  setInterval(refresh, Math.max(1, data.interval) * 1000);
})();
