// levit-serve page: classify images through POST /classify, show the model card (GET /v1/model) and a live
// view computed from successive cumulative snapshots of GET /v1/stats (see service/rest/page.py for why).
// Plain JavaScript, no dependencies. Text from files and from the server is only ever set as textContent.
"use strict";

(() => {
  const WINDOW_S = 60; // the live view's window
  const POLL_MS = 1000;
  const $ = (selector) => document.querySelector(selector);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) if (child != null) node.append(child);
    return node;
  }

  // ---------------------------------------------------------------- statistics (pure, tested in the browser)

  // Prometheus' histogram_quantile: `buckets` are cumulative [upper bound, count] with null for +Inf.
  // Linear interpolation inside the bucket that holds the rank; a rank in +Inf gives the last finite bound.
  function quantile(q, buckets) {
    if (!buckets.length) return null;
    const total = buckets[buckets.length - 1][1];
    if (!(total > 0)) return null;
    const rank = q * total;
    let lower = 0;
    let below = 0;
    for (const [bound, count] of buckets) {
      if (count >= rank) {
        if (bound === null) return lower;
        if (count === below) return bound;
        return lower + ((bound - lower) * (rank - below)) / (count - below);
      }
      if (bound !== null) lower = bound;
      below = count;
    }
    return lower;
  }

  function bucketDelta(newer, older) {
    const before = new Map(older.map(([bound, count]) => [bound, count]));
    return newer.map(([bound, count]) => [bound, count - (before.get(bound) || 0)]);
  }

  // Figures between two cumulative snapshots (older first).
  function between(older, newer) {
    const seconds = newer.time - older.time;
    const latency = bucketDelta(newer.latency_buckets, older.latency_buckets);
    const batches = newer.batches.count - older.batches.count;
    return {
      seconds,
      throughput: seconds > 0 ? (newer.images_classified - older.images_classified) / seconds : null,
      p50: quantile(0.5, latency),
      p90: quantile(0.9, latency),
      p99: quantile(0.99, latency),
      batch: batches > 0 ? (newer.batches.sum - older.batches.sum) / batches : null,
      queue: newer.queue_depth,
      refused: newer.rejections - older.rejections,
    };
  }

  // Keep the snapshots covering the last WINDOW_S seconds (plus the one just before, the window's base).
  // A counter going backwards means the server restarted: start again from the newest snapshot.
  function remember(history, snap) {
    const last = history[history.length - 1];
    if (last && (snap.images_classified < last.images_classified || snap.time <= last.time)) history.length = 0;
    history.push(snap);
    while (history.length > 2 && history[1].time <= snap.time - WINDOW_S) history.shift();
    return history;
  }

  window.levitPage = { quantile, between, remember, WINDOW_S };

  // ---------------------------------------------------------------- live view

  const history = [];

  function formatNumber(value, digits) {
    if (value === null || value === undefined || Number.isNaN(value)) return "–";
    return value.toLocaleString("en", { maximumFractionDigits: digits, minimumFractionDigits: 0 });
  }

  function ms(seconds) {
    if (seconds === null) return "–";
    const value = seconds * 1000;
    return formatNumber(value, value < 10 ? 1 : 0);
  }

  function svg(tag, attrs) {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
    return node;
  }

  // Lines over [start, end] on a 100 x 30 canvas; each series is [[time, value or null]], scaled to the max.
  function drawChart(chart, seriesList, start, end) {
    const values = seriesList.flatMap((s) => s.points.map((p) => p[1]).filter((v) => v !== null));
    const max = Math.max(1e-12, ...values);
    const span = Math.max(end - start, 1e-9);
    const lines = [svg("line", { x1: 0, y1: 30, x2: 100, y2: 30 })];
    for (const series of seriesList) {
      const points = series.points
        .filter((p) => p[1] !== null)
        .map(([t, v]) => `${(((t - start) / span) * 100).toFixed(2)},${(30 - (v / max) * 28).toFixed(2)}`);
      if (points.length) lines.push(svg("polyline", { points: points.join(" "), class: series.class || "" }));
    }
    chart.replaceChildren(...lines);
  }

  function renderLive() {
    if (history.length < 2) return;
    const oldest = history[0];
    const newest = history[history.length - 1];
    const total = between(oldest, newest);
    $("#window").textContent =
      total.seconds >= WINDOW_S - 1
        ? `over the last minute, updated every ${POLL_MS / 1000} s`
        : `over the last ${Math.round(total.seconds)} s (since this page opened), updated every ${POLL_MS / 1000} s`;
    $("#tput .value").textContent = formatNumber(total.throughput, total.throughput < 10 ? 2 : 1);
    for (const node of document.querySelectorAll("#latency .value")) {
      node.textContent = ms(total[`p${Math.round(Number(node.dataset.q) * 100)}`]);
    }
    $("#batch .value").textContent = formatNumber(total.batch, 2);
    $("#queue .value").textContent = formatNumber(newest.queue_depth, 0);
    $("#refused").textContent = total.refused > 0 ? `${formatNumber(total.refused, 0)} refused in this window` : "";

    const steps = [];
    for (let i = 1; i < history.length; i++) steps.push([history[i].time, between(history[i - 1], history[i])]);
    const series = (key) => steps.map(([t, f]) => [t, f[key]]);
    const start = newest.time - WINDOW_S;
    drawChart($("#tput .chart"), [{ points: series("throughput") }], start, newest.time);
    drawChart(
      $("#latency .chart"),
      [
        { points: series("p99"), class: "q99" },
        { points: series("p90"), class: "q90" },
        { points: series("p50") },
      ],
      start,
      newest.time,
    );
    drawChart($("#batch .chart"), [{ points: series("batch") }], start, newest.time);
    drawChart($("#queue .chart"), [{ points: history.map((s) => [s.time, s.queue_depth]) }], start, newest.time);
  }

  async function poll() {
    try {
      const response = await fetch("/v1/stats", { cache: "no-store" });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      remember(history, await response.json());
      renderLive();
    } catch (error) {
      $("#window").textContent = `live figures unavailable: ${error.message}`;
    } finally {
      setTimeout(poll, POLL_MS);
    }
  }

  // ---------------------------------------------------------------- model card

  async function loadModel() {
    let model;
    try {
      const response = await fetch("/v1/model", { cache: "no-store" });
      const body = await response.json();
      if (!response.ok) {
        $("#model-status").textContent = body.error ? body.error.message : `HTTP ${response.status}`;
        setTimeout(loadModel, 2000); // loading: ask again
        return;
      }
      model = body;
    } catch (error) {
      $("#model-status").textContent = `model card unavailable: ${error.message}`;
      setTimeout(loadModel, 2000);
      return;
    }
    $("#model-status").hidden = true;
    $("#model-name").textContent = model.name;
    const weights = model.weights;
    const rows = [
      ["Variant", model.name],
      ["Weights", weights.id, weights.pretrained ? null : "random"],
      ["Source", weights.source],
      ["SHA-256", weights.sha256 || "–"],
      ["Engine", model.engine],
      ["Device", model.device],
      ["Dtype", model.dtype],
      ["Parameters", formatNumber(model.parameters / 1e6, 2) + " M"],
      ["MACs per image", formatNumber(model.macs_per_image / 1e6, 0) + " M"],
      ["Input", model.input_size.join(" × ")],
      ["Max batch size", String(model.batching.max_batch_size)],
      ["Max batch delay", `${formatNumber(model.batching.max_batch_delay_ms, 1)} ms`],
      ["Max queue", `${model.batching.max_queue} images`],
      ["Request timeout", `${formatNumber(model.batching.request_timeout_ms, 0)} ms`],
    ];
    $("#model").replaceChildren(
      ...rows.flatMap(([term, value, cls]) => [el("dt", { text: term }), el("dd", cls ? { class: cls, text: value } : { text: value })]),
    );
    if (!weights.pretrained) {
      $("#banner-weights").textContent = weights.id;
      $("#banner").hidden = false;
    }
  }

  // ---------------------------------------------------------------- classification

  const items = []; // {file, url, node, run}
  let runs = 0;

  function percent(score) {
    const p = score * 100;
    return `${p >= 10 ? p.toFixed(1) : p >= 1 ? p.toFixed(2) : p.toPrecision(2)}%`;
  }

  function kParam() {
    const raw = $("#k").value.trim();
    return raw === "" ? "" : `?k=${encodeURIComponent(raw)}`;
  }

  function addItem(file) {
    const url = URL.createObjectURL(file);
    const thumb = el("img", { class: "thumb", src: url, alt: `preview of ${file.name}` });
    thumb.addEventListener("error", () => thumb.replaceWith(el("div", { class: "thumb", text: "no preview" })), {
      once: true,
    });
    const body = el("div", { class: "body" });
    const node = el("li", { class: "result" }, thumb, body);
    const item = { file, url, node, body, run: 0 };
    items.push(item);
    $("#results").append(node);
    return item;
  }

  function announce(text) {
    $("#announce").textContent = text;
  }

  function showPending(item) {
    item.node.setAttribute("aria-busy", "true");
    item.body.replaceChildren(el("p", { class: "name", text: item.file.name }), el("p", { class: "meta", text: "classifying…" }));
  }

  function showPredictions(item, predictions, elapsedMs, requestId, serverMs) {
    const list = el("ol", { class: "preds", "aria-label": `top ${predictions.length} for ${item.file.name}` });
    for (const p of predictions) {
      const fill = el("span", { class: "fill" });
      fill.style.width = `${Math.max(0, Math.min(100, p.score * 100))}%`;
      list.append(
        el(
          "li",
          { class: "pred" },
          el("span", {}, el("span", { class: "label", text: p.label }), el("span", { class: "wnid", text: p.wnid })),
          el("span", { class: "score", text: percent(p.score) }),
          el("span", { class: "bar", "aria-hidden": "true" }, fill),
        ),
      );
    }
    const meta = el("p", {
      class: "meta",
      text: timingText(elapsedMs, serverMs),
      title: requestId ? `request id ${requestId}` : "",
    });
    item.body.replaceChildren(el("p", { class: "name", text: item.file.name }), meta, list);
    item.node.removeAttribute("aria-busy");
    if (predictions.length) announce(`${item.file.name}: ${predictions[0].label}, ${percent(predictions[0].score)}`);
  }

  function showError(item, code, message, elapsedMs, serverMs) {
    const error = el("p", { class: "error", role: "alert" }, el("code", { text: code }), ": ", el("span", { class: "message", text: message }));
    const meta = el("p", { class: "meta", text: elapsedMs == null ? "no answer" : timingText(elapsedMs, serverMs) });
    item.body.replaceChildren(el("p", { class: "name", text: item.file.name }), meta, error);
    item.node.removeAttribute("aria-busy");
  }

  // The server's own time for the request (its Server-Timing header), next to what the browser waited.
  function serverTiming(header) {
    const match = /(?:^|,)\s*app;dur=([0-9.]+)/.exec(header || "");
    return match ? Number(match[1]) : null;
  }

  function timingText(elapsedMs, serverMs) {
    const trip = `${Math.round(elapsedMs)} ms round trip`;
    return serverMs == null ? trip : `${Math.round(serverMs)} ms on the server, ${trip}`;
  }

  // One request per image, all in flight together: the batcher sees them at once, and each error stays
  // with the image it concerns. Results fill the cards created in upload order, whatever order they arrive.
  async function classify(item, run) {
    item.run = run;
    showPending(item);
    const form = new FormData();
    form.append("img", item.file, item.file.name);
    const started = performance.now();
    let response;
    try {
      response = await fetch(`/classify${kParam()}`, { method: "POST", body: form });
    } catch (error) {
      if (item.run !== run) return;
      showError(item, "no_answer", `the connection closed without an answer (${error.message}); a file far over the upload limit can do this`);
      return;
    }
    const elapsed = performance.now() - started;
    const serverMs = serverTiming(response.headers.get("server-timing"));
    let body = null;
    try {
      body = await response.json();
    } catch {
      body = null;
    }
    if (item.run !== run) return; // a newer run (k changed) owns this card now
    if (response.ok && body && body.results) {
      showPredictions(item, body.results[0].predictions, elapsed, response.headers.get("x-request-id"), serverMs);
    } else {
      const error = body && body.error && typeof body.error === "object" ? body.error : null;
      showError(item, error ? error.code : `HTTP ${response.status}`, error ? error.message : response.statusText, elapsed, serverMs);
      announce(`${item.file.name}: ${error ? error.message : response.status}`);
    }
  }

  function classifyFiles(files) {
    const run = ++runs;
    const added = [...files].map(addItem);
    return Promise.all(added.map((item) => classify(item, run)));
  }

  function rerun() {
    const run = ++runs;
    return Promise.all(items.map((item) => classify(item, run)));
  }

  function clear() {
    runs++;
    for (const item of items) URL.revokeObjectURL(item.url);
    items.length = 0;
    $("#results").replaceChildren();
    announce("results cleared");
  }

  function setup() {
    const input = $("#files");
    input.addEventListener("change", () => {
      if (input.files.length) classifyFiles(input.files);
      input.value = ""; // choosing the same file again classifies it again
    });
    const drop = $("#drop");
    for (const type of ["dragenter", "dragover"]) {
      drop.addEventListener(type, (event) => {
        event.preventDefault();
        drop.classList.add("over");
      });
    }
    for (const type of ["dragleave", "drop"]) drop.addEventListener(type, () => drop.classList.remove("over"));
    drop.addEventListener("drop", (event) => {
      event.preventDefault();
      if (event.dataTransfer.files.length) classifyFiles(event.dataTransfer.files);
    });
    // A file dropped outside the zone would make the browser navigate away from the page.
    document.addEventListener("dragover", (event) => event.preventDefault());
    document.addEventListener("drop", (event) => event.preventDefault());
    document.addEventListener("paste", (event) => {
      const files = event.clipboardData ? [...event.clipboardData.files] : [];
      if (files.length) {
        event.preventDefault();
        classifyFiles(files);
      }
    });
    $("#k").addEventListener("change", () => {
      if (items.length) rerun();
    });
    $("#clear").addEventListener("click", clear);
    loadModel();
    poll();
  }

  window.levitPage.classifyFiles = classifyFiles;
  setup();
})();
