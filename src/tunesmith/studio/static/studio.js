"use strict";
// The studio page: five steps over the JSON routes of studio/app.py. Every string shown comes from
// /static/i18n/<lang>.json (t()); what the user typed and what the model answered is shown as text only.

const $ = (id) => document.getElementById(id);
const S = JSON.parse(localStorage.getItem("tunesmith-studio") || "{}");  // the form, kept across reloads
S.model = S.model || "smollm2-135m-instruct";
S.files = S.files || {};      // file -> {include, mapping, dataset}
S.values = S.values || {};    // custom flag values over the preset
S.preset = S.preset || "quick";
let T = {}, CONFIG = {}, SFT = { presets: {}, fields: [] }, RUNS = [], current = null, chatJob = null, serveJob = null;
const save = () => localStorage.setItem("tunesmith-studio", JSON.stringify(S));

function t(key, vars) {
  let s = T[key] !== undefined ? T[key] : key;
  for (const [k, v] of Object.entries(vars || {})) s = s.replaceAll(`{${k}}`, v);
  return s;
}

async function api(method, path, body, raw) {
  const init = { method, headers: {} };
  if (raw !== undefined) { init.body = raw; init.headers["Content-Type"] = "application/octet-stream"; }
  else if (body !== undefined) { init.body = JSON.stringify(body); init.headers["Content-Type"] = "application/json"; }
  const res = await fetch(path, init);
  const data = await res.json().catch(() => ({}));
  if (!res.ok) throw new Error((data.error && data.error.message) || `HTTP ${res.status}`);
  return data;
}

function showError(msg) { $("error").textContent = msg || ""; $("error").hidden = !msg; }
async function guard(fn) { try { showError(""); return await fn(); } catch (e) { showError(e.message); } }

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v; else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k);
  return e;
}

// ---- language -------------------------------------------------------------------------------------------
async function setLang(lang) {
  T = await (await fetch(`/static/i18n/${lang}.json`)).json();
  document.documentElement.lang = lang === "zh" ? "zh-CN" : "en";
  $("lang").value = lang;
  document.querySelectorAll("[data-i18n]").forEach((e) => { e.textContent = t(e.dataset.i18n); });
  document.querySelectorAll("[data-i18n-placeholder]").forEach((e) => { e.placeholder = t(e.dataset.i18nPlaceholder); });
  renderCustom(); renderPresetHint(); renderRuns(); if (current) renderRun(current);
}

// ---- pages ----------------------------------------------------------------------------------------------
function show(page) {
  document.querySelectorAll(".page").forEach((p) => { p.hidden = p.id !== `page-${page}`; });
  document.querySelectorAll(".steps button").forEach((b) => b.classList.toggle("on", b.dataset.page === page));
  S.page = page; save();
  if (page === "train") refreshCommand();
  if (page === "check" || page === "ship") fillCheckpoints();
}

// ---- 1. model -------------------------------------------------------------------------------------------
async function loadModels() {
  const { bundled, found } = await api("GET", "/api/models");
  const pick = $("model-pick");
  pick.replaceChildren(el("option", { value: bundled, text: `${bundled} (${t("model.bundled")})` }),
    ...found.map((m) => el("option", { value: m.path, text: `${m.path} (${m.kind})` })));
  pick.value = [...pick.options].some((o) => o.value === S.model) ? S.model : bundled;
  $("model-path").value = S.model;
}

async function useModel(model) {
  const info = await api("POST", "/api/model", { model });
  S.model = model; save();
  const d = info.device;
  const rows = [["model.architecture", info.architecture], ["model.params", `${(info.parameters / 1e6).toFixed(1)} M`],
    ["model.dtype", info.dtype], ["model.layers", `${info.layers} × ${info.hidden}`], ["model.context", info.context],
    ["model.identity", info.default_system || t("model.no_identity")],
    ["model.device", `${d.name}${d.free_gib != null ? ` · ${t("model.free", { gib: d.free_gib })}` : ""}`],
    ["model.path", info.path]];
  $("model-info").replaceChildren(...rows.flatMap(([k, v]) => [el("dt", { text: t(k) }), el("dd", { text: String(v) })]));
}

async function runEstimate() {
  const { id } = await api("POST", "/api/estimate", { flags: flags() });
  $("estimate-out").replaceChildren(el("p", { class: "hint", text: t("estimate.running") }));
  for (;;) {
    await sleep(1000);
    const job = await api("GET", `/api/jobs/${id}`);
    if (job.state === "running") {
      $("estimate-out").replaceChildren(el("p", { class: "hint", text: t("estimate.running") }),
        el("pre", { class: "log", text: (job.tail || []).slice(-3).join("\n") }));
      continue;
    }
    if (job.state !== "done" || !job.result || job.result.error) {
      const msg = (job.result && job.result.error) || job.error || t("estimate.failed");
      $("estimate-out").replaceChildren(el("p", { class: "banner", text: msg }), el("pre", { class: "log", text: (job.tail || []).join("\n") }));
      return;
    }
    const r = job.result;
    const table = el("table", { class: "rows", id: "estimate-modes" },
      el("tr", {}, el("th", { text: t("estimate.mode") }), el("th", { text: t("estimate.memory") }), el("th", { text: t("estimate.fits") })),
      ...Object.entries(r.modes_gib).map(([m, g]) => el("tr", { class: m === r.mode ? "chosen" : "" },
        el("td", { text: t(`mode.${m}`) + (m === r.mode ? ` ← ${t("estimate.picked")}` : "") }),
        el("td", { text: `${g.toFixed(2)} GiB` }), el("td", { text: r.fits[m] ? "✓" : "✗" }))));
    const parts = Object.entries(r.parts_s).filter(([, s]) => s >= 0.05).map(([k, s]) => `${t(`part.${k}`)} ${s.toFixed(1)} s`).join(" · ");
    $("estimate-out").replaceChildren(
      el("p", { id: "estimate-time", class: "big", text: t("estimate.result", { time: duration(r.seconds), gib: r.memory_gib.toFixed(2), free: r.free_gib, device: r.device_name }) }),
      el("p", { class: "hint", text: t("estimate.detail", { steps: r.steps, tokens: r.tokens, tps: r.tokens_per_second, probe: r.probe_steps }) }),
      el("p", { class: "hint", text: parts }),
      el("p", { id: "estimate-why", text: r.why }), table);
    return;
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
function duration(s) { s = Math.round(s); return s >= 3600 ? `${Math.floor(s / 3600)}h ${Math.floor(s % 3600 / 60)}m` : `${Math.floor(s / 60)}m ${s % 60}s`; }

// ---- 2. identity and data -------------------------------------------------------------------------------
let identityPage = 0;
async function renderIdentity() {
  for (const k of ["name-zh", "name-en", "author-zh", "author-en"]) S[k] = $(k).value;
  S.identity = $("use-identity").checked; save();
  const q = new URLSearchParams({ name_zh: S["name-zh"], name_en: S["name-en"], author_zh: S["author-zh"], author_en: S["author-en"], page: identityPage });
  const r = await api("GET", `/api/identity?${q}`);
  $("identity-rows").replaceChildren(el("tr", {}, el("th", { text: t("data.lang") }), el("th", { text: t("data.question") }), el("th", { text: t("data.answer") })),
    ...r.rows.map((row) => el("tr", {}, el("td", { text: row.lang }), el("td", { text: row.query }), el("td", { text: row.response }))));
  pager($("identity-pager"), r.page, r.pages, (p) => { identityPage = p; renderIdentity(); });
}

function pager(box, page, pages, go) {
  const prev = el("button", { class: "ghost", text: "‹" }), next = el("button", { class: "ghost", text: "›" });
  prev.disabled = page <= 0; next.disabled = page >= pages - 1;
  prev.onclick = () => go(page - 1); next.onclick = () => go(page + 1);
  box.replaceChildren(prev, el("span", { text: t("page", { page: page + 1, pages: Math.max(pages, 1) }) }), next);
}

async function upload(fileList) {
  for (const f of fileList) {
    if (f.size > CONFIG.max_upload_mb * 1048576) { showError(t("data.too_big", { file: f.name, mb: CONFIG.max_upload_mb })); continue; }
    const r = await api("POST", `/api/upload?name=${encodeURIComponent(f.name)}`, undefined, await f.arrayBuffer());
    S.files[r.file] = { include: true, mapping: {}, dataset: r.dataset }; save();
    renderFile(r);
  }
}

async function inspectFile(file, page) {
  const st = S.files[file] || (S.files[file] = { include: true, mapping: {} });
  const r = await api("POST", "/api/files/inspect", { file, mapping: st.mapping, page: page || 0 });
  st.dataset = r.dataset; save();
  renderFile(r);
}

function renderFile(r) {
  const id = "file-" + r.file.replace(/[^\w]/g, "_");
  let box = document.getElementById(id);
  if (!box) { box = el("div", { class: "file", id }); $("files").append(box); }
  box.dataset.file = r.file;
  const st = S.files[r.file];
  const include = el("input", { type: "checkbox" }); include.checked = st.include !== false;
  include.onchange = () => { st.include = include.checked; save(); };
  const head = el("div", { class: "row" }, el("label", { class: "check" }, include, el("b", { text: r.file })),
    el("span", { class: "hint file-summary", text: r.error ? "" : t("data.file_summary", { good: r.good, total: r.total, bad: r.bad.length }) }));
  const kids = [head];
  if (r.error) kids.push(el("p", { class: "banner bad-row", text: r.error }));
  if (r.unknown_columns && r.unknown_columns.length) {
    const maps = el("div", { class: "mapping" }, el("span", { text: t("data.mapping") }));
    for (const col of r.unknown_columns) {
      const sel = el("select", { class: "map-select", "data-col": col }, el("option", { value: "", text: t("data.ignore") }),
        ...r.targets.map((x) => el("option", { value: x, text: x })));
      sel.value = st.mapping[col] || "";
      sel.onchange = () => { st.mapping[col] = sel.value; save(); };
      maps.append(el("label", {}, el("code", { text: col }), " → ", sel));
    }
    const apply = el("button", { class: "map-apply", text: t("data.apply_mapping") });
    apply.onclick = () => guard(() => inspectFile(r.file, 0));
    maps.append(apply);
    kids.push(maps);
  }
  if (r.rows && r.rows.length) {
    const cols = [...new Set(r.rows.flatMap((x) => Object.keys(x.cells)))];
    kids.push(el("table", { class: "rows preview" }, el("tr", {}, el("th", { text: "#" }), ...cols.map((c) => el("th", { text: c }))),
      ...r.rows.map((x) => el("tr", { class: x.error ? "bad" : "" }, el("td", { text: x.row }), ...cols.map((c) => el("td", { text: x.cells[c] ?? "" }))))));
    const pg = el("div", { class: "pager" }); pager(pg, r.page, r.pages, (p) => guard(() => inspectFile(r.file, p)));
    kids.push(pg);
  }
  if (r.bad && r.bad.length) {
    kids.push(el("h4", { text: t("data.bad_rows", { n: r.bad.length }) }),
      el("ul", { class: "bad-rows" }, ...r.bad.map((b) => el("li", { class: "bad-row", text: b.error }))));
    if (r.dataset) kids.push(el("p", { class: "hint", text: t("data.clean_copy", { file: r.dataset }) }));
  }
  box.replaceChildren(...kids);
}

async function checkData() {
  $("totals").replaceChildren(el("p", { class: "hint", text: t("data.counting") }));
  const c = await api("POST", "/api/check", { flags: flags() });
  const rows = [["data.conversations", c.conversations], ["data.tokens", `${c.tokens_min} / ${c.tokens_median} / ${c.tokens_max}`],
    ["data.supervised", c.supervised_tokens], ["data.steps", `${c.steps} × ${c.samples_per_step}`], ["data.over", c.over_max_length],
    ["data.duplicates", c.duplicates], ["data.sources", Object.entries(c.sources).map(([k, v]) => `${k} ${v}`).join(", ")]];
  $("totals").replaceChildren(el("dl", { class: "facts", id: "totals-table" }, ...rows.flatMap(([k, v]) => [el("dt", { text: t(k) }), el("dd", { text: String(v) })])),
    ...c.warnings.map((w) => el("p", { class: "banner warn", text: w })));
}

// ---- 3. train ------------------------------------------------------------------------------------------
function names(zh, en) { return [S[zh], S[en]].filter((x) => x && x.trim()).length ? [S[zh] || S[en], S[en] || S[zh]] : []; }

function flags() {
  const preset = SFT.presets[S.preset === "custom" ? "quick" : S.preset] || {};
  const f = { ...preset };
  delete f.dataset;
  if (S.preset === "custom") Object.assign(f, S.values);
  f.model = S.model;
  const data = [];
  if (S.identity !== false) data.push("self-cognition");
  for (const st of Object.values(S.files)) if (st.include !== false && st.dataset) data.push(st.dataset);
  const distill = Number(S.distill || 0);
  if (distill > 0) data.push(`general-distill#${distill}`);
  f.dataset = data;
  if (!(distill > 0)) delete f.retain_kl;
  const n = names("name-zh", "name-en"), a = names("author-zh", "author-en");
  if (n.length) f.model_name = n;
  if (a.length) f.model_author = a;
  return f;
}

function renderPresetHint() { $("preset-hint").textContent = t(`preset.${S.preset}_hint`); }

function renderCustom() {
  const box = $("custom");
  if (!SFT.fields.length) return;
  const eff = flags();
  box.replaceChildren(...SFT.fields.filter((f) => !["model", "dataset", "model_name", "model_author", "output_dir", "add_version", "resume_from_checkpoint"].includes(f.name)).map((f) => {
    let input;
    const value = eff[f.name] !== undefined ? eff[f.name] : f.default;
    if (f.kind === "bool") {
      input = el("select", {}, el("option", { value: "", text: "–" }), el("option", { value: "true", text: "true" }), el("option", { value: "false", text: "false" }));
      input.value = value === true ? "true" : value === false ? "false" : "";
    } else if (f.choices) {
      input = el("select", {}, el("option", { value: "", text: "–" }), ...f.choices.map((c) => el("option", { value: String(c), text: String(c) })));
      input.value = value == null ? "" : String(value);
    } else {
      input = el("input", { type: "text" });
      input.value = value == null ? "" : Array.isArray(value) ? value.join(" ") : String(value);
    }
    input.dataset.flag = f.name;
    input.onchange = () => {
      let v = input.value.trim();
      if (f.kind === "bool") v = v === "" ? null : v === "true";
      else if (f.kind === "int" || f.kind === "float") v = v === "" ? null : Number(v);
      else if (f.kind === "list") v = v.split(/\s+/).filter(Boolean);
      if (S.preset !== "custom") { S.values = { ...flags() }; for (const k of ["model", "dataset", "model_name", "model_author"]) delete S.values[k]; S.preset = "custom"; $("preset-custom").checked = true; renderPresetHint(); }
      S.values[f.name] = v; save(); refreshCommand();
    };
    const help = T[`flag.${f.name}`] !== undefined ? t(`flag.${f.name}`) : "";
    return el("label", { class: "flag" }, el("code", { text: `--${f.name}` }), input, el("small", { text: help }));
  }));
}

let commandTimer = null;
function refreshCommand() {
  clearTimeout(commandTimer);
  commandTimer = setTimeout(() => guard(async () => {
    const r = await api("POST", "/api/command", { flags: flags() });
    $("command").textContent = r.command; $("cwd").textContent = r.cwd;
  }), 150);
}

async function startRun() {
  const r = await api("POST", "/api/runs", { flags: flags(), name: $("run-name").value || (S["name-en"] || "run") });
  await loadRuns();
  selectRun(r.id);
}

async function loadRuns() {
  RUNS = (await api("GET", "/api/runs")).runs;
  renderRuns();
}

function stateText(r) { return t(`state.${r.phase || r.state}`); }

function renderRuns() {
  $("runs").replaceChildren(...RUNS.map((r) => {
    const li = el("li", { class: `run-item ${r.state}`, "data-id": r.id },
      el("code", { text: r.id }), el("span", { class: `pill ${r.state}`, text: stateText(r) }),
      el("span", { class: "hint", text: r.last ? `${t("m.step")} ${r.last.step}/${r.last.total} · ${t("m.loss")} ${fmt(r.last.loss)}` : "" }));
    li.onclick = () => selectRun(r.id);
    return li;
  }));
}

let pollTimer = null;
function selectRun(id) {
  S.run = id; save();
  clearTimeout(pollTimer);
  poll();
}

async function poll() {
  if (!S.run) return;
  try {
    current = await api("GET", `/api/runs/${encodeURIComponent(S.run)}`);
    renderRun(current);
    if (["running"].includes(current.state)) { pollTimer = setTimeout(poll, 1000); }
    else { await loadRuns(); }
  } catch (e) { showError(e.message); }
}

const fmt = (v, d = 4) => (v == null ? "–" : Number(v).toFixed(d));

function renderRun(r) {
  $("run").hidden = false;
  $("run-id").textContent = r.id;
  $("run-state").textContent = stateText(r);
  $("run-state").className = `pill ${r.state}`;
  const last = r.last || {};
  const ev = (r.records || []).filter((x) => x.eval_loss != null).pop();
  $("m-step").textContent = last.step ? `${last.step} / ${last.total}` : "–";
  const lossRec = (r.records || []).filter((x) => x.loss != null).pop() || {};
  $("m-loss").textContent = fmt(lossRec.loss);
  $("m-eval").textContent = ev ? fmt(ev.eval_loss) : "–";
  $("m-lr").textContent = lossRec.lr != null ? Number(lossRec.lr).toExponential(2) : "–";
  $("m-tps").textContent = lossRec.tps != null ? String(lossRec.tps) : "–";
  $("m-mem").textContent = lossRec.memory != null ? `${lossRec.memory} GiB` : "–";
  $("m-eta").textContent = r.state === "running" && lossRec.remaining ? lossRec.remaining : "–";
  chart(r.records || [], r);
  $("run-error").hidden = !r.error;
  $("run-error").textContent = r.error ? t("train.failed", { error: r.error }) : "";
  $("run-cmd").textContent = r.command;
  $("run-tail").textContent = (r.tail || []).join("\n");
  $("stop").disabled = r.state !== "running";
  $("resume").disabled = r.state === "running" || !r.checkpoints.length;
  const sel = $("resume-from"), keep = sel.value;
  sel.replaceChildren(...r.checkpoints.map((c) => el("option", { value: c, text: c })));
  if (r.checkpoints.includes(keep)) sel.value = keep; else if (r.checkpoints.length) sel.value = r.checkpoints[r.checkpoints.length - 1];
}

function chart(records, run) {
  const svg = $("chart"), W = 640, H = 220, L = 48, R = 12, Tp = 12, B = 28;
  const train = records.filter((x) => x.loss != null), ev = records.filter((x) => x.eval_loss != null);
  const pts = [...train.map((x) => x.loss), ...ev.map((x) => x.eval_loss)];
  const ns = "http://www.w3.org/2000/svg";
  const mk = (tag, a) => { const e = document.createElementNS(ns, tag); for (const [k, v] of Object.entries(a)) e.setAttribute(k, v); return e; };
  svg.replaceChildren();
  $("chart-note").textContent = pts.length ? "" : (run.state === "running" ? t("chart.waiting") : t("chart.empty"));
  if (!pts.length) return;
  const total = Math.max(...records.map((x) => x.total || x.step), 1);
  let lo = Math.min(...pts), hi = Math.max(...pts);
  if (hi - lo < 1e-6) { lo -= 0.5; hi += 0.5; }
  const x = (s) => L + (W - L - R) * (total <= 1 ? 0.5 : (s - 1) / (total - 1));
  const y = (v) => Tp + (H - Tp - B) * (1 - (v - lo) / (hi - lo));
  svg.append(mk("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis" }), mk("line", { x1: L, y1: Tp, x2: L, y2: H - B, class: "axis" }));
  for (const v of [lo, (lo + hi) / 2, hi]) { const tx = mk("text", { x: L - 4, y: y(v) + 4, class: "tick", "text-anchor": "end" }); tx.textContent = v.toFixed(2); svg.append(tx); }
  for (const s of [1, total]) { const tx = mk("text", { x: x(s), y: H - 8, class: "tick", "text-anchor": s === 1 ? "start" : "end" }); tx.textContent = `${t("m.step")} ${s}`; svg.append(tx); }
  if (train.length > 1) svg.append(mk("polyline", { points: train.map((p) => `${x(p.step)},${y(p.loss)}`).join(" "), class: "loss" }));
  for (const p of train) svg.append(mk("circle", { cx: x(p.step), cy: y(p.loss), r: 3, class: "pt loss-pt" }));
  if (ev.length > 1) svg.append(mk("polyline", { points: ev.map((p) => `${x(p.step)},${y(p.eval_loss)}`).join(" "), class: "eval" }));
  for (const p of ev) svg.append(mk("circle", { cx: x(p.step), cy: y(p.eval_loss), r: 4, class: "pt eval-pt" }));
  const legend = mk("text", { x: W - R, y: Tp + 10, class: "tick", "text-anchor": "end" });
  legend.textContent = ev.length ? `— ${t("m.loss")}   ● ${t("m.eval")}` : `— ${t("m.loss")}`;
  svg.append(legend);
}

// ---- 4. check ------------------------------------------------------------------------------------------
async function fillCheckpoints() {
  await loadRuns();
  const all = RUNS.flatMap((r) => r.checkpoints.map((c) => `runs/${r.id}/${c}`));
  for (const id of ["check-ckpt", "ship-ckpt"]) {
    const sel = $(id), keep = sel.value;
    sel.replaceChildren(...all.map((c) => el("option", { value: c, text: c })));
    if (all.includes(keep)) sel.value = keep;
  }
  if (!$("serve-path").value && $("ship-ckpt").value) $("serve-path").value = `${$("ship-ckpt").value}-merged`;
}

async function openReport() {
  const ck = $("check-ckpt").value;
  if (!ck) { showError(t("check.no_checkpoint")); return; }
  const r = await api("GET", `/api/report?checkpoint=${encodeURIComponent(ck)}`);
  if (!r.report) { $("report-state").textContent = t("check.missing"); $("report").replaceChildren(); return; }
  $("report-state").textContent = "";
  const rep = r.report, kids = [];
  const rows = Object.entries(rep.by_lang).map(([lang, v]) => el("tr", {}, el("td", { text: lang === "all" ? t("check.all") : lang }),
    el("td", { text: pct(v.base.adopted) }), el("td", { text: pct(v.tuned.adopted) }), el("td", { text: pct(v.base.leaked) }), el("td", { text: pct(v.tuned.leaked) })));
  kids.push(el("table", { class: "rows", id: "report-identity" }, el("tr", {}, ...["check.lang", "check.adopted_base", "check.adopted_tuned", "check.leaked_base", "check.leaked_tuned"].map((k) => el("th", { text: t(k) }))), ...rows));
  const ret = rep.retention;
  kids.push(el("p", { id: "report-kl", text: t("check.retention", { kl: ret.mean_kl.toFixed(3), retained: pct(ret.retained), intrusion: pct(ret.intrusion), cb: pct(ret.correct_base), ct: pct(ret.correct_tuned) }) }));
  kids.push(el("h4", { text: t("check.worst") }), el("ul", {}, ...rep.worst.map((w) => el("li", { text: `KL ${w.kl.toFixed(3)} · ${w.prompt} → ${w.tuned}` }))));
  for (const a of r.advice) kids.push(el("p", { class: "banner warn", text: a }));
  if (r.plot) kids.push(el("img", { src: `/api/file?path=${encodeURIComponent(r.plot)}`, alt: "eval.png", class: "plot" }));
  $("report").replaceChildren(...kids);
}
const pct = (v) => `${Math.round(v * 100)}%`;

async function runReport() {
  const ck = $("check-ckpt").value;
  if (!ck) { showError(t("check.no_checkpoint")); return; }
  const { id } = await api("POST", "/api/report", { checkpoint: ck });
  for (;;) {
    const job = await api("GET", `/api/jobs/${id}`);
    $("report-state").textContent = `${t("check.running")} ${(job.tail || []).slice(-1).join("")}`;
    if (job.state !== "running") { if (job.state === "failed") showError(job.error); break; }
    await sleep(1500);
  }
  await openReport();
}

async function startChat() {
  const ck = $("check-ckpt").value;
  if (!ck) { showError(t("check.no_checkpoint")); return; }
  if (chatJob) await api("POST", `/api/jobs/${chatJob}/stop`).catch(() => {});
  chatJob = (await api("POST", "/api/chat/start", { checkpoint: ck })).id;
  S.chatJob = chatJob; save();
  await watchChat();
}

async function watchChat() {
  for (;;) {
    const job = await api("GET", `/api/jobs/${chatJob}`);
    $("chat-state").textContent = job.ready ? t("chat.ready") : job.state === "running" ? t("chat.loading") : t(`state.${job.state}`);
    $("chat-state").className = `pill ${job.ready ? "done" : job.state}`;
    if (job.state !== "running") { if (job.error) showError(job.error); return; }
    if (job.ready) return;
    await sleep(1000);
  }
}

const history = { base: [], tuned: [] };
async function sendChat() {
  const text = $("chat-input").value.trim();
  if (!text || !chatJob) { if (!chatJob) showError(t("chat.not_started")); return; }
  $("chat-input").value = "";
  await Promise.all(["base", "tuned"].map((which) => answer(which, text)));
}

async function answer(which, text) {
  const box = $(`chat-${which}`);
  box.append(el("div", { class: "msg user", text }));
  const out = el("div", { class: "msg assistant streaming" });
  box.append(out);
  history[which].push({ role: "user", content: text });
  const res = await fetch(`/api/chat/${chatJob}/${which}`, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ messages: history[which], max_tokens: 96 }) });
  if (!res.ok) { const d = await res.json().catch(() => ({})); out.textContent = (d.error && d.error.message) || `HTTP ${res.status}`; out.classList.add("failed"); out.classList.remove("streaming"); return; }
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buf = "", full = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += value;
    let end;
    while ((end = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, end).replace(/^data:\s*/, ""); buf = buf.slice(end + 2);
      if (line === "[DONE]" || !line) continue;
      const ev = JSON.parse(line);
      if (ev.error) { out.textContent = ev.error.message; out.classList.add("failed"); continue; }
      const d = ev.choices && ev.choices[0] && ev.choices[0].delta;
      if (d && d.content) { full += d.content; out.textContent = full; }
    }
  }
  out.classList.remove("streaming");
  history[which].push({ role: "assistant", content: full });
}

// ---- 5. ship -------------------------------------------------------------------------------------------
async function exportModel() {
  const ck = $("ship-ckpt").value;
  if (!ck) { showError(t("check.no_checkpoint")); return; }
  const { id, path } = await api("POST", "/api/export", { checkpoint: ck, gguf_type: $("gguf-type").value });
  const started = Date.now();
  $("export-tail").hidden = false;
  for (;;) {
    const job = await api("GET", `/api/jobs/${id}`);
    $("export-tail").textContent = (job.tail || []).slice(-6).join("\n");
    $("export-files").replaceChildren(...(job.files || []).map((f) => el("li", { text: f })));
    if (job.state === "running") { $("export-state").textContent = t("ship.exporting", { s: Math.round((Date.now() - started) / 1000) }); await sleep(1000); continue; }
    $("export-state").textContent = job.state === "done" ? t("ship.exported", { path: `${ck}-merged` }) : t("train.failed", { error: job.error });
    if (job.state === "done") $("serve-path").value = `${ck}-merged`;
    return;
  }
}

async function serveModel() {
  const path = $("serve-path").value, port = Number($("serve-port").value);
  if (serveJob) await api("POST", `/api/jobs/${serveJob}/stop`).catch(() => {});
  const job = await api("POST", "/api/serve", { path, port });
  serveJob = job.id; S.serveJob = serveJob; save();
  await watchServe();
}

async function watchServe() {
  for (;;) {
    const job = await api("GET", `/api/jobs/${serveJob}`);
    if (job.state !== "running") { $("serve-state").textContent = job.error ? t("train.failed", { error: job.error }) : t(`state.${job.state}`); $("snippets").hidden = true; return; }
    if (job.ready) {
      $("serve-state").textContent = t("ship.ready", { url: `http://127.0.0.1:${job.port}/v1` });
      const url = `http://127.0.0.1:${job.port}/v1`;
      $("snippets").textContent = `curl ${url}/chat/completions -H 'Content-Type: application/json' \\\n  -d '{"model": "${job.model}", "messages": [{"role": "user", "content": "Who are you?"}]}'\n\n` +
        `from openai import OpenAI\nclient = OpenAI(base_url="${url}", api_key="none")\n` +
        `reply = client.chat.completions.create(model="${job.model}", messages=[{"role": "user", "content": "Who are you?"}])\nprint(reply.choices[0].message.content)`;
      $("snippets").hidden = false;
      return;
    }
    $("serve-state").textContent = t("ship.starting");
    await sleep(1000);
  }
}

// ---- start ---------------------------------------------------------------------------------------------
async function main() {
  CONFIG = await api("GET", "/api/config");
  const lang = CONFIG.lang || S.lang || ((navigator.language || "en").toLowerCase().startsWith("zh") ? "zh" : "en");
  $("lang").disabled = !!CONFIG.lang;
  SFT = await api("GET", "/api/sft");
  for (const k of ["name-zh", "name-en", "author-zh", "author-en"]) $(k).value = S[k] || "";
  $("use-identity").checked = S.identity !== false;
  $("distill").value = S.distill || 0; $("distill-value").textContent = $("distill").value;
  $(`preset-${S.preset}`).checked = true;
  await setLang(lang);
  document.querySelectorAll(".steps button").forEach((b) => { b.onclick = () => show(b.dataset.page); });
  $("lang").onchange = () => { S.lang = $("lang").value; save(); setLang(S.lang); };
  $("model-pick").onchange = () => { $("model-path").value = $("model-pick").value; guard(() => useModel($("model-pick").value)); };
  $("model-load").onclick = () => guard(() => useModel($("model-path").value));
  $("estimate").onclick = () => guard(runEstimate);
  for (const k of ["name-zh", "name-en", "author-zh", "author-en"]) $(k).oninput = () => { identityPage = 0; guard(renderIdentity); };
  $("use-identity").onchange = () => guard(renderIdentity);
  $("file-input").onchange = () => guard(() => upload($("file-input").files));
  $("drop").ondragover = (e) => { e.preventDefault(); $("drop").classList.add("over"); };
  $("drop").ondragleave = () => $("drop").classList.remove("over");
  $("drop").ondrop = (e) => { e.preventDefault(); $("drop").classList.remove("over"); guard(() => upload(e.dataTransfer.files)); };
  $("distill").oninput = () => { S.distill = Number($("distill").value); $("distill-value").textContent = S.distill; save(); };
  $("check-data").onclick = () => guard(checkData);
  document.querySelectorAll("input[name=preset]").forEach((r) => { r.onchange = () => {
    S.preset = r.value;
    if (r.value === "balanced" && !(S.distill > 0)) {  // the preset's own general-distill#N
      const d = (SFT.presets.balanced.dataset || []).find((x) => x.startsWith("general-distill#"));
      S.distill = d ? Number(d.split("#")[1]) : 0; $("distill").value = S.distill; $("distill-value").textContent = S.distill;
    }
    save(); renderPresetHint(); renderCustom(); refreshCommand(); }; });
  $("copy").onclick = () => navigator.clipboard && navigator.clipboard.writeText(`cd ${$("cwd").textContent} && ${$("command").textContent}`);
  $("start").onclick = () => guard(startRun);
  $("stop").onclick = () => guard(async () => { await api("POST", `/api/runs/${S.run}/stop`); poll(); });
  $("resume").onclick = () => guard(async () => { await api("POST", `/api/runs/${S.run}/resume`, { checkpoint: $("resume-from").value }); clearTimeout(pollTimer); poll(); });
  $("report-open").onclick = () => guard(openReport);
  $("report-run").onclick = () => guard(runReport);
  $("chat-start").onclick = () => guard(startChat);
  $("chat-send").onclick = () => guard(sendChat);
  $("chat-input").onkeydown = (e) => { if (e.key === "Enter") guard(sendChat); };
  $("export").onclick = () => guard(exportModel);
  $("serve").onclick = () => guard(serveModel);
  $("serve-stop").onclick = () => guard(async () => { if (serveJob) await api("POST", `/api/jobs/${serveJob}/stop`); $("snippets").hidden = true; $("serve-state").textContent = t("state.stopped"); });
  await guard(loadModels);
  await guard(() => useModel(S.model));
  await guard(renderIdentity);
  for (const file of Object.keys(S.files)) await guard(() => inspectFile(file, 0));
  await guard(loadRuns);
  if (S.run && RUNS.some((r) => r.id === S.run)) selectRun(S.run);
  if (S.chatJob) { chatJob = S.chatJob; guard(watchChat); }
  if (S.serveJob) { serveJob = S.serveJob; guard(watchServe); }
  show(S.page || "model");
  setInterval(() => { if (!document.hidden && S.page === "train") loadRuns().catch(() => {}); }, 3000);
}

main().catch((e) => showError(e.message));
