// The dashboard: plain JavaScript, no framework, no build step, no network beyond the API.
// Pages are hash routes (#/jobs, #/job/ID, #/compare?jobs=A,B, #/sweeps, #/sweep/ID, #/nets,
// #/models, #/workers, #/predict).
"use strict";

const KEY_STORAGE = "cnn.apiKey";
const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"];
const $ = (sel, root) => (root || document).querySelector(sel);
const main = () => $("#main");

// ------------------------------------------------------------------ helpers
function h(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "class") node.className = v;
    else if (k === "html") node.innerHTML = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    node.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}
const pct = (v, d = 1) => (typeof v === "number" ? `${(v * 100).toFixed(d)}%` : "–");
const num = (v, d = 4) => (typeof v === "number" ? v.toFixed(d) : "–");
const shortId = (id) => id.slice(0, 8);
const when = (iso) => (iso ? new Date(iso).toLocaleString([], { dateStyle: "short", timeStyle: "medium" }) : "–");
function duration(job) {
  if (!job.started_at) return "–";
  const end = job.finished_at ? new Date(job.finished_at) : new Date();
  const s = Math.max(0, Math.round((end - new Date(job.started_at)) / 1000));
  return s >= 60 ? `${Math.floor(s / 60)}m ${String(s % 60).padStart(2, "0")}s` : `${s}s`;
}
const badge = (status) => h("span", { class: `badge ${status}`, "data-status": status }, status);
function progress(job) {
  const { epoch, epochs } = job.progress;
  return h("span", { class: "progress" },
    h("span", { class: "bar" }, h("span", { style: `width:${Math.min(100, (100 * epoch) / Math.max(1, epochs))}%` })),
    h("span", {}, `epoch ${epoch} of ${epochs}`));
}
function toast(message, bad) {
  const t = $("#toast");
  t.textContent = message;
  t.className = bad ? "toast bad" : "toast";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, bad ? 7000 : 3500);
}

// ------------------------------------------------------------------ the API and the key
const Key = {
  get: () => sessionStorage.getItem(KEY_STORAGE),
  set: (k) => sessionStorage.setItem(KEY_STORAGE, k),
  clear: () => sessionStorage.removeItem(KEY_STORAGE),
};

class ApiError extends Error {
  constructor(status, code, message) { super(message); this.status = status; this.code = code; }
}

async function api(path, options) {
  const o = options || {};
  const headers = Object.assign({}, o.headers || {});
  const key = Key.get();
  if (key) headers.Authorization = `Bearer ${key}`;
  let body = o.body;
  if (o.json !== undefined) { headers["Content-Type"] = "application/json"; body = JSON.stringify(o.json); }
  const response = await fetch(path, { method: o.method || "GET", headers, body, signal: o.signal });
  if (response.status === 401) { showLogin("The key was refused (401). Enter a valid key."); throw new ApiError(401, "unauthorized", "unauthorized"); }
  if (!response.ok) {
    let code = "http_error", message = `${response.status} ${response.statusText}`;
    try { const e = (await response.json()).error; code = e.code; message = e.message; } catch (_) { /* not JSON */ }
    throw new ApiError(response.status, code, message);
  }
  if (o.raw) return response;
  if (response.status === 204) return null;
  return response.json();
}

// Server-sent events over fetch (EventSource cannot send the Authorization header).
// Reconnects with Last-Event-ID until the job's terminal status arrives or `stop()`.
function followEvents(jobId, onEvent) {
  const controller = new AbortController();
  let lastId = null, done = false;
  async function connect() {
    while (!done) {
      try {
        const headers = { Accept: "text/event-stream" };
        if (lastId) headers["Last-Event-ID"] = lastId;
        const key = Key.get();
        if (key) headers.Authorization = `Bearer ${key}`;
        const response = await fetch(`/jobs/${jobId}/events`, { headers, signal: controller.signal });
        if (response.status === 204) return;
        if (!response.ok) throw new Error(`events: HTTP ${response.status}`);
        const reader = response.body.getReader();
        const decoder = new TextDecoder();
        let buffer = "";
        for (;;) {
          const { value, done: end } = await reader.read();
          if (end) break;
          buffer += decoder.decode(value, { stream: true });
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            let id = null, kind = "message";
            const data = [];
            for (const line of block.split("\n")) {
              if (line.startsWith(":")) continue;
              const i = line.indexOf(":");
              const field = i < 0 ? line : line.slice(0, i);
              const val = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
              if (field === "id") id = val; else if (field === "event") kind = val; else if (field === "data") data.push(val);
            }
            if (!data.length) continue;
            if (id) lastId = id;
            const payload = JSON.parse(data.join("\n"));
            onEvent(kind, payload);
            if (kind === "status" && TERMINAL.has(payload.status)) { done = true; controller.abort(); return; }
          }
        }
      } catch (err) {
        if (done || controller.signal.aborted) return;
      }
      if (!done) await new Promise((r) => setTimeout(r, 1500));
    }
  }
  connect();
  return { stop() { done = true; controller.abort(); } };
}

// ------------------------------------------------------------------ login
function showLogin(message) {
  Key.clear();
  $("#login").hidden = false;
  $("#keybox").hidden = true;
  main().hidden = true;
  $("#nav").style.visibility = "hidden";
  const err = $("#login-error");
  err.hidden = !message;
  err.textContent = message || "";
  $("#key-input").focus();
}

async function useKey(key) {
  Key.set(key);
  let readable = true;
  try {
    await api("/jobs?limit=1");
  } catch (err) {
    // 403: a valid key without the read scope (a predict-only key): the Predict page works.
    if (err.status !== 403) {
      if (err.status !== 401) showLogin(`Cannot use this key: ${err.message}`);
      return;
    }
    readable = false;
  }
  $("#login").hidden = true;
  main().hidden = false;
  $("#nav").style.visibility = "visible";
  $("#keybox").hidden = false;
  $("#key-label").textContent = `key …${key.slice(-4)}${readable ? "" : " (predict only)"}`;
  if (!readable && !location.hash.startsWith("#/predict")) location.hash = "#/predict"; // routes
  else route();
}

// ------------------------------------------------------------------ router
let cleanup = [];
let routeSeq = 0;
function onLeave(fn) { cleanup.push(fn); }

function route() {
  cleanup.forEach((fn) => fn());
  cleanup = [];
  if (!Key.get()) { showLogin(); return; }
  const hash = location.hash.replace(/^#\/?/, "") || "jobs";
  const [path, query] = hash.split("?");
  const params = new URLSearchParams(query || "");
  const [page, arg] = path.split("/");
  const section = page === "job" ? "jobs" : page === "sweep" ? "sweeps" : page;
  document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === section));
  const pages = { jobs: pageJobs, job: pageJob, compare: pageCompare, sweeps: pageSweeps, sweep: pageSweep, nets: pageNets, models: pageModels, workers: pageWorkers, predict: pagePredict };
  const render = pages[page] || pageJobs;
  main().innerHTML = "";
  document.title = `CNN service · ${page}`;
  const seq = ++routeSeq;
  render(arg, params).catch((err) => {
    if (err.status === 401 || seq !== routeSeq) return; // 401: the login shows; else we left

    main().appendChild(h("div", { class: "card error" }, `Could not load this page: ${err.message}`));
  });
}

// ------------------------------------------------------------------ Jobs
let jobSchemaCache = null;
async function jobSchema() {
  if (!jobSchemaCache) {
    const spec = await fetch("/openapi.json").then((r) => r.json());
    const schemas = spec.components.schemas;
    const deref = (s) => (s && s.$ref ? schemas[s.$ref.split("/").pop()] : s);
    const props = schemas.JobCreate.properties;
    jobSchemaCache = Object.entries(props).map(([name, raw]) => {
      const options = (raw.anyOf || [raw]).map(deref);
      const main = options.find((s) => s.type !== "null") || {};
      return {
        name,
        title: raw.title || name,
        description: raw.description || "",
        type: main.type || "string",
        enum: main.enum,
        nullable: options.some((s) => s.type === "null"),
        default: raw.default,
        minimum: main.minimum, maximum: main.maximum,
        exclusiveMinimum: main.exclusiveMinimum,
      };
    });
  }
  return jobSchemaCache;
}

function jobForm(fields, nets, onSubmit) {
  const form = h("form", { id: "job-form" });
  const grid = h("div", { class: "form-grid" });
  for (const f of fields) {
    let input;
    if (f.name === "net") {
      input = h("select", { name: "net" }, nets.map((n) => h("option", { value: n.name }, `${n.name} · ${n.title}`)));
    } else if (f.enum) {
      input = h("select", { name: f.name },
        f.nullable ? h("option", { value: "" }, "(default)") : null,
        f.enum.map((v) => h("option", { value: v, selected: v === f.default }, v)));
    } else if (f.type === "boolean") {
      input = h("input", { type: "checkbox", name: f.name, checked: f.default === true });
      grid.appendChild(h("label", { class: "check", title: f.description }, input, f.title));
      continue;
    } else if (f.type === "integer" || f.type === "number") {
      input = h("input", {
        type: "number", name: f.name, step: f.type === "integer" ? "1" : "any",
        min: f.minimum, max: f.maximum,
        value: f.default === null || f.default === undefined ? "" : f.default,
        placeholder: f.nullable ? "none" : "",
      });
    } else {
      input = h("input", { type: "text", name: f.name, value: f.default || "", placeholder: f.nullable ? "default" : "" });
    }
    grid.appendChild(h("label", { title: f.description }, f.title, input));
  }
  form.appendChild(grid);
  form.appendChild(h("div", { class: "row", style: "margin-top:0.9rem" },
    h("button", { type: "submit", id: "job-submit" }, "Start job"),
    h("span", { class: "muted" }, "Defaults are the course's: Adam, batch 128, 20% validation, 20 epochs.")));
  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const body = {};
    for (const f of fields) {
      const input = form.elements[f.name];
      if (f.type === "boolean") { body[f.name] = input.checked; continue; }
      const raw = input.value.trim();
      if (raw === "") { if (!f.nullable && f.name !== "net") continue; if (f.nullable) continue; }
      body[f.name] = f.type === "integer" ? parseInt(raw, 10) : f.type === "number" ? parseFloat(raw) : raw;
    }
    onSubmit(body);
  });
  return form;
}

async function pageJobs() {
  const [nets, fields] = await Promise.all([api("/nets"), jobSchema()]);
  const tableBody = h("tbody", { id: "jobs-body" });
  const selected = new Set();
  const compareButton = h("button", { class: "secondary", id: "compare-selected", disabled: true, onclick: () => { location.hash = `#/compare?jobs=${[...selected].join(",")}`; } }, "Compare selected");
  const formCard = h("div", { class: "card", id: "new-job", hidden: true },
    h("h2", {}, "New training job"),
    jobForm(fields, nets.nets, async (body) => {
      try {
        const job = await api("/jobs", { method: "POST", json: body });
        toast(`Job ${shortId(job.id)} queued`);
        location.hash = `#/job/${job.id}`;
      } catch (err) { if (err.status !== 401) toast(err.message, true); }
    }));
  main().append(
    h("div", { class: "row", style: "margin-bottom:0.8rem" },
      h("h1", { style: "margin:0" }, "Jobs"), h("span", { class: "spacer" }),
      compareButton,
      h("button", { id: "new-job-toggle", onclick: () => { formCard.hidden = !formCard.hidden; } }, "New job")),
    formCard,
    h("div", { class: "card" },
      h("table", { id: "jobs-table" },
        h("thead", {}, h("tr", {}, ["", "Job", "Status", "Net", "Progress", "Test acc.", "Started", "Duration", ""].map((t, i) => h("th", { class: i === 5 ? "num" : null }, t)))),
        tableBody),
      h("p", { class: "muted", id: "jobs-empty", hidden: true }, "No jobs yet: start one with “New job”.")));

  async function refresh() {
    const list = await api("/jobs?limit=100");
    tableBody.innerHTML = "";
    $("#jobs-empty").hidden = list.jobs.length > 0;
    for (const job of list.jobs) {
      const box = h("input", { type: "checkbox", class: "pick", "data-id": job.id, checked: selected.has(job.id), onchange: (ev) => {
        if (ev.target.checked) selected.add(job.id); else selected.delete(job.id);
        compareButton.disabled = selected.size < 2;
      } });
      const cancel = TERMINAL.has(job.status) ? null : h("button", { class: "danger", onclick: async () => {
        try { await api(`/jobs/${job.id}/cancel`, { method: "POST" }); toast("Cancel requested"); refresh(); } catch (err) { toast(err.message, true); }
      } }, "Cancel");
      tableBody.appendChild(h("tr", { "data-id": job.id },
        h("td", {}, box),
        h("td", {}, h("a", { href: `#/job/${job.id}`, class: "mono" }, shortId(job.id)), job.parameters.model_name !== job.net ? h("span", { class: "muted" }, ` ${job.parameters.model_name}`) : null),
        h("td", {}, badge(job.status)),
        h("td", {}, job.net),
        h("td", {}, progress(job)),
        h("td", { class: "num" }, job.evaluation ? pct(job.evaluation.test_accuracy) : "–"),
        h("td", {}, when(job.started_at)),
        h("td", {}, duration(job)),
        h("td", {}, cancel)));
    }
  }
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), 2000);
  onLeave(() => clearInterval(timer));
}

// ------------------------------------------------------------------ one job
function curveCharts(epochs) {
  const pick = (key) => epochs.map((e) => [e.epoch, e[key]]);
  return {
    accuracy: [
      { name: "accuracy (train)", points: pick("accuracy"), color: "#2759c7" },
      { name: "val_accuracy", points: pick("val_accuracy"), color: "#d1495b" },
    ],
    loss: [
      { name: "loss (train)", points: pick("loss"), color: "#2759c7" },
      { name: "val_loss", points: pick("val_loss"), color: "#d1495b" },
    ],
  };
}

function hbars(labels, values, highlight, id) {
  const best = highlight === undefined ? values.indexOf(Math.max(...values)) : highlight;
  return h("div", { class: "hbars", id }, labels.map((name, i) => [
    h("span", { class: "name" }, name),
    h("span", { class: "track" }, h("span", { class: i === best ? "fill top" : "fill", style: `width:${(100 * Math.max(0, values[i])).toFixed(1)}%` })),
    h("span", { class: "val" }, pct(values[i])),
  ]));
}

function confusionHeatmap(matrix, classes) {
  const max = Math.max(1, ...matrix.flat());
  return h("table", { class: "heat", id: "confusion" },
    h("thead", {}, h("tr", {}, h("th", { class: "rowhead" }, "true ↓ / predicted →"), classes.map((c) => h("th", {}, c.slice(0, 5))))),
    h("tbody", {}, matrix.map((row, i) => h("tr", {},
      h("th", { class: "rowhead" }, classes[i]),
      row.map((v, j) => {
        const a = v / max;
        const color = i === j ? `rgba(29,127,70,${0.12 + 0.88 * a})` : `rgba(179,38,30,${a * 0.9})`;
        return h("td", { style: `background:${color};color:${a > 0.55 ? "#fff" : "#1d2330"}`, title: `true ${classes[i]}, predicted ${classes[j]}: ${v}` }, v);
      })))));
}

async function pageJob(jobId) {
  let job = await api(`/jobs/${jobId}`);
  let epochs = (await api(`/jobs/${jobId}/history`)).epochs;
  const header = h("div", { class: "card", id: "job-header" });
  const accChart = h("div", { id: "chart-accuracy" });
  const lossChart = h("div", { id: "chart-loss" });
  const analysis = h("div", { class: "card", id: "analysis" });
  const evaluation = h("div", { id: "evaluation" });
  main().append(header,
    h("div", { class: "grid2" }, h("div", { class: "card" }, accChart), h("div", { class: "card" }, lossChart)),
    analysis, evaluation);

  function drawHeader() {
    const cancel = TERMINAL.has(job.status) ? null : h("button", { class: "danger", id: "job-cancel", onclick: async () => {
      try { job = await api(`/jobs/${jobId}/cancel`, { method: "POST" }); drawHeader(); toast("Cancel requested"); } catch (err) { toast(err.message, true); }
    } }, "Cancel");
    const p = job.parameters;
    header.innerHTML = "";
    header.append(
      h("div", { class: "row" },
        h("h1", { style: "margin:0" }, `${job.net} · `, h("span", { class: "mono" }, shortId(job.id))),
        badge(job.status), progress(job), h("span", { class: "spacer" }),
        h("a", { href: `#/compare?jobs=${job.id}` }, "compare…"), cancel),
      h("dl", { class: "facts", style: "margin-top:0.8rem" },
        h("dt", {}, "Parameters"), h("dd", {}, `${p.epochs} epochs, batch ${p.batch_size}, ${p.optimizer} lr ${p.learning_rate}, validation ${p.validation_split}` + (p.train_limit ? `, first ${p.train_limit} images` : "") + (p.precision ? `, ${p.precision}` : "")),
        h("dt", {}, "Ran on"), h("dd", {}, job.device ? `${job.device} (${job.worker || "?"}), attempt ${job.attempts}` : "not started"),
        h("dt", {}, "Started"), h("dd", {}, `${when(job.started_at)} · ${duration(job)}`),
        job.model_version ? [h("dt", {}, "Model"), h("dd", {}, h("a", { href: "#/models" }, `${job.model_version.name} version ${job.model_version.version}`))] : null,
        job.error ? [h("dt", {}, "Error"), h("dd", { class: "error" }, job.error)] : null));
  }

  function drawCurves() {
    const c = curveCharts(epochs);
    Charts.line(accChart, c.accuracy, { title: "Accuracy", xLabel: "epoch", percent: true });
    Charts.line(lossChart, c.loss, { title: "Loss", xLabel: "epoch" });
    accChart.dataset.epochs = String(epochs.length);
  }

  async function drawAnalysis() {
    const history = await api(`/jobs/${jobId}/history`);
    const a = history.analysis;
    analysis.innerHTML = "";
    analysis.append(h("h2", {}, "Analysis"), h("dl", { class: "facts" },
      h("dt", {}, "Best epoch (lowest val_loss)"), h("dd", { id: "best-epoch" }, a.best_epoch ?? "–"),
      h("dt", {}, "Overfitting after epoch"), h("dd", {}, a.overfitting_after_epoch ?? "none seen"),
      h("dt", {}, "Final gap (train − val accuracy)"), h("dd", {}, num(a.final_gap, 3)),
      h("dt", {}, "Largest gap"), h("dd", {}, a.max_gap === null ? "–" : `${num(a.max_gap, 3)} at epoch ${a.max_gap_epoch}`)));
  }

  async function drawEvaluation() {
    if (job.status !== "succeeded") { evaluation.innerHTML = ""; return; }
    const e = await api(`/jobs/${jobId}/evaluation`);
    const classes = e.classes || CLASSES;
    const first = e.first_image;
    evaluation.innerHTML = "";
    evaluation.append(h("div", { class: "grid3" },
      h("div", { class: "card" }, h("h2", {}, "Confusion matrix (test set)"), confusionHeatmap(e.confusion_matrix, classes)),
      h("div", { class: "card" },
        h("h2", {}, "Test set"),
        h("dl", { class: "facts" },
          h("dt", {}, "Test accuracy"), h("dd", { id: "test-accuracy" }, pct(e.test_accuracy, 2)),
          h("dt", {}, "Test loss"), h("dd", {}, num(e.test_loss))),
        h("h3", {}, "Per-class accuracy"), hbars(classes, e.per_class_accuracy, -1, "per-class")),
      h("div", { class: "card" },
        h("h2", {}, "First test image"),
        h("p", {}, "predicted ", h("b", {}, classes[first.predicted_class]), ", true ", h("b", {}, classes[first.true_class]),
          " ", h("span", { class: first.match ? "badge succeeded" : "badge failed" }, first.match ? "correct" : "wrong")),
        hbars(classes, first.probabilities, undefined, "first-image"))));
  }

  drawHeader(); drawCurves(); await drawAnalysis(); await drawEvaluation();
  if (!TERMINAL.has(job.status)) {
    const stream = followEvents(jobId, async (kind, data) => {
      if (kind === "epoch") {
        // An epoch we already hold means the job restarted from there: drop it and later ones.
        epochs = epochs.filter((e) => e.epoch < data.epoch).concat([data]);
        job.progress.epoch = data.epoch;
        drawCurves(); drawHeader();
        drawAnalysis().catch(() => {});
      } else if (kind === "status") {
        job = data.job || await api(`/jobs/${jobId}`);
        drawHeader();
        if (TERMINAL.has(job.status)) {
          epochs = (await api(`/jobs/${jobId}/history`)).epochs;
          drawCurves(); await drawAnalysis(); await drawEvaluation();
        }
      }
    });
    const ticker = setInterval(drawHeader, 1000); // the duration keeps counting
    onLeave(() => { stream.stop(); clearInterval(ticker); });
  }
}

// ------------------------------------------------------------------ compare
async function compareData(ids) {
  try {
    return (await api(`/compare?jobs=${ids.join(",")}`)).jobs;
  } catch (err) {
    if (err.status !== 404 || err.code === "job_not_found") throw err;
  }
  // No /compare on this server: build the same rows from each job's own endpoints.
  return Promise.all(ids.map(async (id) => {
    const [job, history] = await Promise.all([api(`/jobs/${id}`), api(`/jobs/${id}/history`)]);
    let summary = null;
    try { summary = await api(`/summary/${job.net}`); } catch (_) { /* custom net */ }
    return {
      id, net: job.net, model_name: job.parameters.model_name,
      parameters: summary ? summary.total_params : null, macs: summary ? summary.macs_per_image : null,
      epochs: history.epochs.length, precision: job.parameters.precision, device: job.device,
      training_seconds: history.epochs.reduce((s, e) => s + e.seconds, 0),
      test_loss: job.evaluation ? job.evaluation.test_loss : null,
      test_accuracy: job.evaluation ? job.evaluation.test_accuracy : null,
      best_epoch: history.analysis.best_epoch, overfitting_after_epoch: history.analysis.overfitting_after_epoch,
      final_gap: history.analysis.final_gap, max_gap: history.analysis.max_gap,
      history: history.history && history.history.epoch ? history.history : {
        epoch: history.epochs.map((e) => e.epoch), loss: history.epochs.map((e) => e.loss),
        accuracy: history.epochs.map((e) => e.accuracy), val_loss: history.epochs.map((e) => e.val_loss),
        val_accuracy: history.epochs.map((e) => e.val_accuracy),
      },
    };
  }));
}

async function pageCompare(_, params) {
  const chosen = new Set((params.get("jobs") || "").split(",").filter(Boolean));
  const list = await api("/jobs?limit=100");
  const picker = h("div", { class: "card" },
    h("div", { class: "row" }, h("h1", { style: "margin:0" }, "Compare jobs"), h("span", { class: "spacer" }),
      h("span", { class: "muted" }, "Tick jobs to overlay their curves.")),
    h("div", { class: "row", id: "compare-picker", style: "margin-top:0.6rem" },
      list.jobs.map((job) => h("label", { class: "row", style: "gap:0.3rem;border:1px solid #dde1e8;border-radius:6px;padding:0.25rem 0.55rem" },
        h("input", { type: "checkbox", value: job.id, checked: chosen.has(job.id), onchange: (ev) => {
          if (ev.target.checked) chosen.add(job.id); else chosen.delete(job.id);
          history.replaceState(null, "", `#/compare?jobs=${[...chosen].join(",")}`);
          draw();
        } }),
        h("span", {}, `${job.parameters.model_name} `), h("span", { class: "mono muted" }, shortId(job.id)), badge(job.status)))));
  const charts = h("div", { class: "grid2" }, h("div", { class: "card" }, h("div", { id: "compare-accuracy" })), h("div", { class: "card" }, h("div", { id: "compare-loss" })));
  const table = h("div", { class: "card", id: "compare-table" });
  main().append(picker, charts, table);

  async function draw() {
    const ids = [...chosen];
    if (!ids.length) {
      Charts.line($("#compare-accuracy"), [], { title: "Validation accuracy", empty: "choose jobs above" });
      Charts.line($("#compare-loss"), [], { title: "Validation loss", empty: "choose jobs above" });
      table.innerHTML = "";
      return;
    }
    const rows = await compareData(ids);
    const label = (r) => `${r.model_name || r.net} ${shortId(r.id)}`;
    const series = (key) => rows.map((r, i) => ({
      name: label(r), color: Charts.PALETTE[i % Charts.PALETTE.length],
      points: r.history.epoch.map((e, k) => [e, r.history[key][k]]),
    }));
    Charts.line($("#compare-accuracy"), series("val_accuracy"), { title: "Validation accuracy", xLabel: "epoch", percent: true });
    Charts.line($("#compare-loss"), series("val_loss"), { title: "Validation loss", xLabel: "epoch" });
    const cols = [
      ["Job", (r, i) => h("span", {}, h("span", { class: "swatch", style: `background:${Charts.PALETTE[i % Charts.PALETTE.length]}` }), h("a", { href: `#/job/${r.id}` }, label(r)))],
      ["Net", (r) => r.net], ["Parameters", (r) => (r.parameters ? r.parameters.toLocaleString() : "–"), true],
      ["Epochs", (r) => r.epochs, true], ["Test acc.", (r) => pct(r.test_accuracy, 2), true],
      ["Test loss", (r) => num(r.test_loss), true], ["Best epoch", (r) => r.best_epoch ?? "–", true],
      ["Overfits after", (r) => r.overfitting_after_epoch ?? "–", true], ["Final gap", (r) => num(r.final_gap, 3), true],
      ["Train time", (r) => (typeof r.training_seconds === "number" ? `${r.training_seconds.toFixed(1)} s` : "–"), true],
      ["Device", (r) => r.device || "–"],
    ];
    table.innerHTML = "";
    table.append(h("table", {},
      h("thead", {}, h("tr", {}, cols.map(([t, , n]) => h("th", { class: n ? "num" : null }, t)))),
      h("tbody", {}, rows.map((r, i) => h("tr", {}, cols.map(([, f, n]) => h("td", { class: n ? "num" : null }, f(r, i))))))));
  }
  await draw();
}

// ------------------------------------------------------------------ sweeps
const SWEEP_EXAMPLE = {
  kind: "search",
  base: { net: "net1", epochs: 4, train_limit: 2000 },
  space: {
    learning_rate: { type: "float", low: 0.0001, high: 0.01, log: true },
    batch_size: { type: "choice", choices: [32, 64, 128] },
  },
  sampler: "tpe", max_trials: 12, parallelism: 2,
  objective: { metric: "val_accuracy", direction: "maximize" },
  pruner: { type: "asha" }, seed: 0,
};
const ABLATION_EXAMPLE = { kind: "ablation", epochs: 8, parallelism: 1 };
const trialState = (state) => h("span", { class: `badge ${state}`, "data-state": state }, state);
const sweepCounts = (s) => `${s.counts.complete + s.counts.pruned + s.counts.fail}/${s.max_trials}`;

async function pageSweeps() {
  const text = h("textarea", { id: "sweep-json", rows: 14, spellcheck: "false" }, JSON.stringify(SWEEP_EXAMPLE, null, 2));
  const formCard = h("div", { class: "card", id: "new-sweep", hidden: true },
    h("h2", {}, "New sweep"),
    h("p", { class: "muted" }, "The POST /sweeps body: a search over job options, or an ablation from NET III to NET IV (docs/sweeps.md)."),
    text,
    h("div", { class: "row", style: "margin-top:0.7rem" },
      h("button", { id: "sweep-submit", onclick: async () => {
        let body;
        try { body = JSON.parse(text.value); } catch (err) { toast(`Not JSON: ${err.message}`, true); return; }
        try {
          const sweep = await api("/sweeps", { method: "POST", json: body });
          toast(`Sweep ${shortId(sweep.id)} started`);
          location.hash = `#/sweep/${sweep.id}`;
        } catch (err) { if (err.status !== 401) toast(err.message, true); }
      } }, "Start sweep"),
      h("button", { class: "secondary", onclick: () => { text.value = JSON.stringify(SWEEP_EXAMPLE, null, 2); } }, "Search example"),
      h("button", { class: "secondary", onclick: () => { text.value = JSON.stringify(ABLATION_EXAMPLE, null, 2); } }, "Ablation example")));
  const tableBody = h("tbody", { id: "sweeps-body" });
  main().append(
    h("div", { class: "row", style: "margin-bottom:0.8rem" },
      h("h1", { style: "margin:0" }, "Sweeps"), h("span", { class: "spacer" }),
      h("button", { id: "new-sweep-toggle", onclick: () => { formCard.hidden = !formCard.hidden; } }, "New sweep")),
    formCard,
    h("div", { class: "card" },
      h("table", { id: "sweeps-table" },
        h("thead", {}, h("tr", {}, ["Sweep", "Kind", "Status", "Trials", "Running", "Pruned", "Failed", "Best (validation)", "Created"].map((t, i) => h("th", { class: i >= 3 && i <= 7 ? "num" : null }, t)))),
        tableBody),
      h("p", { class: "muted", id: "sweeps-empty", hidden: true }, "No sweeps yet: start one with “New sweep”.")));

  async function refresh() {
    const list = await api("/sweeps?limit=100");
    tableBody.innerHTML = "";
    $("#sweeps-empty").hidden = list.sweeps.length > 0;
    for (const s of list.sweeps) {
      tableBody.appendChild(h("tr", { "data-id": s.id },
        h("td", {}, h("a", { href: `#/sweep/${s.id}`, class: "mono" }, shortId(s.id)), s.name ? h("span", { class: "muted" }, ` ${s.name}`) : null),
        h("td", {}, s.kind), h("td", {}, badge(s.status)),
        h("td", { class: "num" }, sweepCounts(s)), h("td", { class: "num" }, s.counts.running),
        h("td", { class: "num" }, s.counts.pruned), h("td", { class: "num" }, s.counts.fail),
        h("td", { class: "num" }, s.best_value === null ? "–" : `${s.objective.metric} ${num(s.best_value)}`),
        h("td", {}, when(s.created_at))));
    }
  }
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), 3000);
  onLeave(() => clearInterval(timer));
}

function trialLabel(t) {
  if (t.role) return t.role;
  return Object.entries(t.params).map(([k, v]) => `${k}=${typeof v === "number" && !Number.isInteger(v) ? v.toPrecision(3) : v}`).join(", ");
}

async function pageSweep(id) {
  const header = h("div", { class: "card", id: "sweep-header" });
  const best = h("div", { class: "card", id: "sweep-best" });
  const curves = h("div", { class: "card" }, h("div", { id: "sweep-curves" }));
  const picture = h("div", { class: "card", id: "sweep-picture" });
  const table = h("div", { class: "card", id: "sweep-trials" });
  main().append(header, h("div", { class: "grid2" }, best, curves), table, picture);
  let pictureFor = null;

  async function draw() {
    const s = await api(`/sweeps/${id}`);
    const metric = s.objective.metric;
    document.title = `CNN service · sweep ${shortId(s.id)}`;
    header.innerHTML = "";
    header.append(h("div", { class: "row" },
      h("h1", { style: "margin:0" }, `Sweep ${shortId(s.id)}`), s.name ? h("span", { class: "muted" }, s.name) : null, badge(s.status),
      h("span", { class: "muted" }, `${s.kind}: ${sweepCounts(s)} trials, ${s.parallelism} at a time, ${s.objective.direction} ${metric}`),
      h("span", { class: "spacer" }),
      s.status === "running" ? h("button", { class: "danger", id: "sweep-cancel", onclick: async () => {
        try { await api(`/sweeps/${id}/cancel`, { method: "POST" }); toast("Sweep cancelled"); draw(); } catch (err) { toast(err.message, true); }
      } }, "Cancel sweep") : null));
    if (s.error) header.append(h("p", { class: "error", id: "sweep-error" }, s.error));

    best.innerHTML = "";
    best.append(h("h2", {}, "Best trial (by validation)"));
    if (s.best_trial) {
      const b = s.best_trial;
      best.append(h("dl", { class: "facts", id: "best-trial" },
        h("dt", {}, "Trial"), h("dd", {}, `${b.number}: ${trialLabel(b)}`),
        h("dt", {}, metric), h("dd", { id: "best-value" }, `${num(b.value)} (epoch ${b.value_epoch})`),
        h("dt", {}, "Test accuracy"), h("dd", {}, `${pct(b.test_accuracy, 2)} (shown, not used to choose)`),
        h("dt", {}, "Job"), h("dd", {}, h("a", { href: `#/job/${b.job_id}`, class: "mono" }, shortId(b.job_id)))));
    } else best.append(h("p", { class: "muted" }, "No complete trial yet."));
    const names = Object.keys(s.importances);
    if (names.length) {
      best.append(h("h2", {}, "Parameter importances"), hbars(names, names.map((n) => s.importances[n]), 0, "importances"));
    } else if (s.importances_note) best.append(h("p", { class: "muted" }, s.importances_note));

    const series = s.trials.filter((t) => t.curve.length).map((t) => ({
      name: `${t.number} ${t.state}`, color: Charts.PALETTE[t.number % Charts.PALETTE.length],
      points: t.curve.map((p) => [p.epoch, p[metric]]),
    }));
    Charts.line($("#sweep-curves"), series, { title: `${metric} per epoch, every trial`, xLabel: "epoch", percent: metric === "val_accuracy", empty: "no epoch yet" });

    table.innerHTML = "";
    table.append(h("table", { id: "trials-table" },
      h("thead", {}, h("tr", {}, ["#", s.kind === "ablation" ? "Role" : "Parameters", "State", metric, "At epoch", "Pruned after", "Test acc.", "Job"].map((t, i) => h("th", { class: i >= 3 && i <= 6 ? "num" : null }, t)))),
      h("tbody", {}, s.trials.map((t) => h("tr", { "data-number": t.number, class: s.best_trial && s.best_trial.number === t.number ? "best" : null },
        h("td", {}, t.number), h("td", { title: t.error || "" }, trialLabel(t)), h("td", {}, trialState(t.state)),
        h("td", { class: "num" }, num(t.value)), h("td", { class: "num" }, t.value_epoch ?? "–"),
        h("td", { class: "num" }, t.pruned_epoch ?? "–"), h("td", { class: "num" }, pct(t.test_accuracy, 2)),
        h("td", {}, t.job_id ? h("a", { href: `#/job/${t.job_id}`, class: "mono" }, shortId(t.job_id)) : "–"))))));

    const told = s.trials.filter((t) => t.value !== null).length;
    if (told && told !== pictureFor) {
      pictureFor = told;
      try {
        const blob = await (await api(`/sweeps/${id}.png`, { raw: true })).blob();
        picture.innerHTML = "";
        picture.append(h("h2", {}, "Optimisation history and parameters"), h("img", { id: "sweep-png", src: URL.createObjectURL(blob), alt: "sweep plots", style: "max-width:100%" }));
      } catch (_) { /* drawn at the next refresh */ }
    }
    return s;
  }
  const first = await draw();
  if (first.status === "running" || first.counts.running) {
    const timer = setInterval(() => draw().then((s) => { if (s.status !== "running" && !s.counts.running) clearInterval(timer); }).catch(() => {}), 2000);
    onLeave(() => clearInterval(timer));
  }
}

// ------------------------------------------------------------------ networks
async function pageNets(arg) {
  const nets = (await api("/nets")).nets;
  const current = arg || nets[0].name;
  const s = await api(`/summary/${current}`);
  main().append(
    h("div", { class: "row", style: "margin-bottom:0.8rem" }, h("h1", { style: "margin:0" }, "Networks"),
      nets.map((n) => h("a", { href: `#/nets/${n.name}`, class: n.name === current ? "badge running" : "badge" }, `${n.name} · ${n.title}`))),
    h("div", { class: "card" },
      h("h2", {}, `${s.title || s.net}: ${s.layout || ""}`),
      h("p", { class: "muted" }, (nets.find((n) => n.name === current) || {}).description || ""),
      h("dl", { class: "facts" },
        h("dt", {}, "Input"), h("dd", {}, (s.input_shape || []).join(" × ")),
        h("dt", {}, "Parameters"), h("dd", { id: "net-params" }, `${s.total_params.toLocaleString()} (Keras counts ${s.keras_total_params.toLocaleString()}: ${s.agrees ? "agrees" : "differs"})`),
        h("dt", {}, "Multiply-adds per image"), h("dd", {}, s.macs_per_image ? s.macs_per_image.toLocaleString() : "–"),
        h("dt", {}, "Weights"), h("dd", {}, s.weight_bytes ? `${(s.weight_bytes / 1024 / 1024).toFixed(2)} MiB (float32)` : "–"))),
    h("div", { class: "card" }, h("table", { id: "layers" },
      h("thead", {}, h("tr", {}, ["Layer", "Type", "Input", "Output", "Parameters", "Formula"].map((t, i) => h("th", { class: i === 4 ? "num" : null }, t)))),
      h("tbody", {}, s.layers.map((l) => h("tr", {},
        h("td", {}, l.name), h("td", {}, l.type),
        h("td", { class: "mono" }, (l.input_shape || []).join("×")), h("td", { class: "mono" }, (l.output_shape || []).join("×")),
        h("td", { class: "num" }, l.params.toLocaleString()),
        h("td", { class: "formula" }, l.formula || "")))))));
}

// ------------------------------------------------------------------ workers
function secondsAgo(iso) {
  return `${Math.max(0, Math.round((Date.now() - new Date(iso)) / 1000))} s ago`;
}

async function pageWorkers() {
  const showLost = h("input", { type: "checkbox", id: "workers-include-lost" });
  const tableBody = h("tbody", { id: "workers-body" });
  main().append(
    h("div", { class: "row", style: "margin-bottom:0.8rem" },
      h("h1", { style: "margin:0" }, "Workers"), h("span", { class: "spacer" }),
      h("label", {}, showLost, " also lost and stopped")),
    h("div", { class: "card" },
      h("p", { class: "muted" }, "Each training worker beats every few seconds; one silent past the heartbeat timeout is lost (GET /workers)."),
      h("table", { id: "workers-table" },
        h("thead", {}, h("tr", {}, ["Worker", "Host", "Device", "GPUs", "Backend", "Queues", "Job", "State", "Heartbeat", "Started"].map((t, i) => h("th", { class: i === 3 ? "num" : null }, t)))),
        tableBody),
      h("p", { class: "muted", id: "workers-empty", hidden: true }, "No live worker: start one with `cnn worker` (or `cnn serve`).")));

  async function refresh() {
    const list = await api(`/workers?limit=1000${showLost.checked ? "&include_lost=true" : ""}`);
    tableBody.innerHTML = "";
    $("#workers-empty").hidden = list.workers.length > 0;
    for (const w of list.workers) {
      tableBody.appendChild(h("tr", { "data-worker": w.name, "data-state": w.state },
        h("td", { class: "mono" }, w.name), h("td", {}, w.host), h("td", {}, w.device),
        h("td", { class: "num" }, w.gpu_count), h("td", {}, w.keras_backend),
        h("td", { class: "mono" }, w.queues.join(", ") || "–"),
        h("td", { class: "job" }, w.current_job_id ? h("a", { href: `#/job/${w.current_job_id}`, class: "mono" }, shortId(w.current_job_id)) : "idle"),
        h("td", {}, h("span", { class: `badge ${w.state}`, "data-status": w.state }, w.state)),
        h("td", {}, secondsAgo(w.last_heartbeat_at)), h("td", {}, when(w.started_at))));
    }
  }
  showLost.addEventListener("change", () => refresh().catch(() => {}));
  await refresh();
  const timer = setInterval(() => refresh().catch(() => {}), 3000);
  onLeave(() => clearInterval(timer));
}

// ------------------------------------------------------------------ models
async function download(url, filename) {
  const response = await api(url, { raw: true });
  const blob = await response.blob();
  const a = h("a", { href: URL.createObjectURL(blob), download: filename });
  document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(a.href), 10000);
}

async function pageModels() {
  const models = (await api("/models")).models;
  main().append(h("h1", {}, "Models"));
  if (!models.length) { main().append(h("div", { class: "card muted" }, "No registered model yet: a job that succeeds registers one.")); return; }
  for (const m of models) {
    const detail = await api(`/models/${m.name}`);
    const aliasInput = h("input", { type: "text", name: "alias", value: Object.keys(detail.aliases)[0] || "production", pattern: "[A-Za-z0-9_-]+", style: "width:10rem" });
    const versionSelect = h("select", { name: "version" }, detail.versions.map((v) => h("option", { value: v.version }, `version ${v.version}`)));
    const card = h("div", { class: "card", "data-model": m.name },
      h("div", { class: "row" }, h("h2", { style: "margin:0" }, m.name), h("span", { class: "muted" }, `${detail.versions.length} version(s), latest ${detail.latest_version}`),
        h("span", { class: "spacer" }),
        h("form", { class: "row alias-form", onsubmit: async (ev) => {
          ev.preventDefault();
          try {
            const r = await api(`/models/${m.name}/aliases/${aliasInput.value}`, { method: "PUT", json: { version: parseInt(versionSelect.value, 10) } });
            toast(`${r.name}@${r.alias} now points at version ${r.version}`);
            route();
          } catch (err) { toast(err.message, true); }
        } }, h("span", {}, "point alias"), aliasInput, h("span", {}, "at"), versionSelect, h("button", { type: "submit" }, "Move alias"))),
      h("table", { style: "margin-top:0.6rem" },
        h("thead", {}, h("tr", {}, ["Version", "Aliases", "Net", "Test acc.", "From job", "Registered", "sha256", "Size", ""].map((t, i) => h("th", { class: i === 3 || i === 7 ? "num" : null }, t)))),
        h("tbody", {}, detail.versions.slice().reverse().map((v) => h("tr", { "data-version": v.version },
          h("td", {}, v.version),
          h("td", { class: "aliases" }, v.aliases.length ? v.aliases.map((a) => h("span", { class: "badge running", style: "margin-right:0.3rem" }, a)) : "–"),
          h("td", {}, v.net), h("td", { class: "num" }, pct((v.metrics || {}).test_accuracy, 2)),
          h("td", {}, v.job_id ? h("a", { href: `#/job/${v.job_id}`, class: "mono" }, shortId(v.job_id)) : "–"),
          h("td", {}, when(v.created_at)), h("td", { class: "mono" }, v.sha256.slice(0, 12)),
          h("td", { class: "num" }, `${(v.size_bytes / 1024).toFixed(0)} KiB`),
          h("td", {}, h("button", { class: "secondary", onclick: () => download(v.artifact_url, `${v.name}-v${v.version}.keras`).catch((err) => toast(err.message, true)) }, "Download")))))));
    main().append(card);
  }
}

// ------------------------------------------------------------------ predict
async function pagePredict() {
  // A predict-only key cannot list models (403): then the model and target are typed in.
  let models = null;
  try { models = (await api("/models")).models; } catch (err) { if (err.status !== 403) throw err; }
  main().append(h("h1", {}, "Predict"));
  if (models && !models.length) { main().append(h("div", { class: "card muted" }, "No registered model yet.")); return; }
  let modelSelect, targetSelect;
  if (models) {
    modelSelect = h("select", { id: "predict-model" }, models.map((m) => h("option", { value: m.name }, m.name)));
    targetSelect = h("select", { id: "predict-target" });
    const fillTargets = async () => {
      const detail = await api(`/models/${modelSelect.value}`);
      targetSelect.innerHTML = "";
      targetSelect.append(h("option", { value: "" }, `latest (version ${detail.latest_version})`),
        Object.entries(detail.aliases).map(([a, v]) => h("option", { value: `alias:${a}` }, `@${a} (version ${v})`)),
        detail.versions.map((v) => h("option", { value: `version:${v.version}` }, `version ${v.version}`)));
    };
    modelSelect.addEventListener("change", fillTargets);
    await fillTargets();
  } else {
    modelSelect = h("input", { id: "predict-model", placeholder: "model name", required: true });
    targetSelect = h("input", { id: "predict-target", placeholder: "latest, @alias or a version" });
  }
  // "" (latest), "alias:a" or "version:n", from the select or from the typed "@a" / "n".
  function target() {
    const t = targetSelect.value.trim();
    if (models || !t) return t;
    return t.startsWith("@") ? `alias:${t.slice(1)}` : `version:${t}`;
  }
  const fileInput = h("input", { type: "file", id: "predict-file", accept: "image/png,image/jpeg", hidden: true });
  const drop = h("div", { class: "drop", id: "drop" }, "Drop a PNG or JPEG here, or click to choose one. Any size: it is resized to 32×32.");
  const canvas = h("canvas", { class: "pixelated", width: 32, height: 32, id: "preview" });
  const result = h("div", { id: "predict-result" }, h("p", { class: "muted" }, "The ten class probabilities appear here."));
  drop.addEventListener("click", () => fileInput.click());
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => { ev.preventDefault(); drop.classList.remove("over"); if (ev.dataTransfer.files[0]) predictFile(ev.dataTransfer.files[0]); });
  fileInput.addEventListener("change", () => { if (fileInput.files[0]) predictFile(fileInput.files[0]); });

  async function predictFile(file) {
    const bitmap = await createImageBitmap(file);
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = true;
    ctx.clearRect(0, 0, 32, 32);
    ctx.drawImage(bitmap, 0, 0, 32, 32);
    const form = new FormData();
    form.append("model", modelSelect.value);
    const chosen = target();
    if (chosen.startsWith("alias:")) form.append("alias", chosen.slice(6));
    if (chosen.startsWith("version:")) form.append("version", chosen.slice(8));
    form.append("resize", "true");
    form.append("file", file, file.name);
    result.innerHTML = "";
    try {
      const body = await api("/predict/image", { method: "POST", body: form });
      const p = body.predictions[0];
      result.append(
        h("h2", {}, "Predicted: ", h("span", { id: "predicted-class" }, p.class_name), " ", h("span", { class: "muted" }, pct(Math.max(...p.probabilities)))),
        h("p", { class: "muted" }, `${body.model.name} version ${body.model.version}`),
        hbars(body.classes, p.probabilities, undefined, "probabilities"));
    } catch (err) {
      if (err.status !== 401) result.append(h("p", { class: "error" }, err.message));
    }
  }
  main().append(h("div", { class: "grid2" },
    h("div", { class: "card" },
      h("div", { class: "row", style: "margin-bottom:0.8rem" }, h("label", {}, "Model ", modelSelect), h("label", {}, "Serve ", targetSelect)),
      drop, fileInput,
      h("div", { class: "row", style: "margin-top:1rem;align-items:flex-start" }, canvas, h("p", { class: "muted", style: "max-width:16rem" }, "The image as the network sees it: 32×32 pixels, enlarged."))),
    h("div", { class: "card" }, result)));
}

// ------------------------------------------------------------------ start
document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", (ev) => { ev.preventDefault(); useKey($("#key-input").value.trim()); });
  $("#key-forget").addEventListener("click", () => showLogin());
  window.addEventListener("hashchange", route);
  const key = Key.get();
  if (key) useKey(key); else showLogin();
});
