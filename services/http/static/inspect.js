// lmstack inspect: the page calls POST /v1/inspect (the Inspect RPC as JSON) and draws its answer.
// No libraries, nothing from the network but the server that served this page.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { resp: null, attention: [], selected: null };

// --- the API -----------------------------------------------------------------------------------
async function api(path, body) {
  const headers = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;  // the server's API key, when it has keys
  const r = await fetch(path, body === undefined ? { headers } : {
    method: "POST", headers, body: JSON.stringify(body),
  });
  const data = await r.json().catch(() => ({}));
  if (!r.ok) {
    const message = (data.error && data.error.message) || `${r.status} ${r.statusText}`;
    throw new Error(message);
  }
  return data;
}

async function loadModels() {
  const data = await api("/v1/models");
  const select = $("model");
  select.innerHTML = "";
  for (const m of data.data || []) {
    const opt = document.createElement("option");
    opt.value = opt.textContent = m.id;
    select.appendChild(opt);
  }
  $("status").textContent = `${select.options.length} model(s) served`;
}

// --- float16 weights ---------------------------------------------------------------------------
function halfToFloat(h) {
  const sign = h & 0x8000 ? -1 : 1, exp = (h >> 10) & 0x1f, frac = h & 0x3ff;
  if (exp === 0) return sign * Math.pow(2, -14) * (frac / 1024);
  if (exp === 31) return frac ? NaN : sign * Infinity;
  return sign * Math.pow(2, exp - 15) * (1 + frac / 1024);
}

function unpackAttention(layer) {
  // base64 little-endian float16, shape [heads, T, T] -> Float32Array views per head
  const bin = atob(layer.weights || "");
  const view = new DataView(new ArrayBuffer(bin.length));
  for (let i = 0; i < bin.length; i++) view.setUint8(i, bin.charCodeAt(i));
  const [H, T] = [layer.shape[0], layer.shape[1]];
  const heads = [];
  for (let h = 0; h < H; h++) {
    const a = new Float32Array(T * T);
    for (let i = 0; i < T * T; i++) a[i] = halfToFloat(view.getUint16(2 * (h * T * T + i), true));
    heads.push(a);
  }
  return { layer: layer.layer || 0, heads: layer.heads || [], T, weights: heads };
}

// --- drawing -----------------------------------------------------------------------------------
const show = (text) => text.replace(/ /g, "\u2423").replace(/\n/g, "\\n").replace(/\t/g, "\\t");

function surpriseOf(t) {
  // token t's surprise: position t-1's next_prob (the first token has nothing before it)
  const pos = state.resp.positions[t - 1];
  return t > 0 && pos && pos.has_next ? pos.surprise_bits : 0;
}

function drawTokens() {
  const box = $("tokens");
  box.innerHTML = "";
  const bits = state.resp.tokens.map((_, t) => surpriseOf(t));
  const max = Math.max(1, ...bits);
  $("maxbits").textContent = `${max.toFixed(1)} bits`;
  state.resp.tokens.forEach((tok, t) => {
    const span = document.createElement("span");
    span.className = "token";
    span.dataset.index = t;
    span.textContent = tok.text;
    const k = bits[t] / max;
    span.style.background = `rgba(224, 49, 49, ${(0.85 * k).toFixed(3)})`;
    span.title = t > 0 ? `${show(tok.text)}: ${bits[t].toFixed(2)} bits (p=${state.resp.positions[t - 1].next_prob.toPrecision(3)}, rank ${state.resp.positions[t - 1].next_rank})`
      : `${show(tok.text)}: the first token (nothing predicted it)`;
    span.addEventListener("click", () => select(t));
    span.addEventListener("mouseenter", () => { if (state.selected === null) drawNext(t); });
    box.appendChild(span);
  });
}

function drawNext(t) {
  const pos = state.resp.positions[t];
  const tok = state.resp.tokens[t];
  $("next-title").textContent = `after token ${t} (${show(tok.text)})`;
  const actual = $("next-actual");
  if (pos.has_next) {
    const nxt = state.resp.tokens[t + 1];
    actual.innerHTML = "";
    actual.append("came next: ", piece(nxt.text),
      ` p=${pos.next_prob.toPrecision(3)}, rank ${pos.next_rank}, ${pos.surprise_bits.toFixed(2)} bits`);
  } else {
    actual.textContent = "the end of the text: what the model would write next";
  }
  const body = $("topk-table").querySelector("tbody");
  body.innerHTML = "";
  (pos.top || []).forEach((alt, i) => {
    const tr = document.createElement("tr");
    const bar = `<span class="bar" style="width:${Math.round(120 * alt.prob)}px"></span>`;
    tr.innerHTML = `<td>${i + 1}</td><td></td><td>${bar}${percent(alt.prob)}</td>`;
    tr.children[1].appendChild(piece(alt.token || ""));
    body.appendChild(tr);
  });
}

const percent = (p) => (p >= 0.01 ? `${(100 * p).toFixed(1)}%` : `${(100 * p).toPrecision(2)}%`);

function piece(text) {
  const s = document.createElement("span");
  s.className = "piece";
  s.textContent = show(text);
  return s;
}

function currentHead() {
  const layer = state.attention[Number($("layer").value)];
  return layer ? { layer, w: layer.weights[Number($("head").value)] } : null;
}

function drawAttention() {
  const cur = currentHead();
  const view = document.querySelector("input[name=view]:checked").value;
  $("lines").style.display = view === "lines" ? "" : "none";  // an SVG element has no `hidden` property
  $("heatmap").hidden = view !== "heatmap";
  if (!cur) return;
  if (view === "lines") drawLines(cur.w, cur.layer.T); else drawHeatmap(cur.w, cur.layer.T);
}

function drawLines(w, T) {
  // BertViz's head view: queries on the left, keys on the right, one line per weight
  const svg = $("lines");
  const rowH = 18, width = svg.clientWidth || 600, xl = 150, xr = width - 150;
  svg.setAttribute("height", T * rowH + 10);
  svg.setAttribute("viewBox", `0 0 ${width} ${T * rowH + 10}`);
  svg.innerHTML = "";
  const ns = "http://www.w3.org/2000/svg";
  const y = (i) => 12 + i * rowH;
  const rows = state.selected === null ? [...Array(T).keys()] : [state.selected];
  for (const q of rows) {
    for (let k = 0; k <= q; k++) {
      const a = w[q * T + k];
      if (a < 0.01) continue;
      const line = document.createElementNS(ns, "line");
      line.setAttribute("x1", xl + 6); line.setAttribute("y1", y(q) - 4);
      line.setAttribute("x2", xr - 6); line.setAttribute("y2", y(k) - 4);
      line.setAttribute("stroke", "#3b5bdb");
      line.setAttribute("stroke-opacity", Math.min(1, a * (rows.length === 1 ? 1 : 0.8)).toFixed(3));
      line.setAttribute("stroke-width", (0.5 + 3 * a).toFixed(2));
      line.dataset.weight = a.toFixed(4);
      svg.appendChild(line);
    }
  }
  state.resp.tokens.forEach((tok, i) => {
    for (const [x, anchor] of [[xl, "end"], [xr, "start"]]) {
      const text = document.createElementNS(ns, "text");
      text.setAttribute("x", x); text.setAttribute("y", y(i));
      text.setAttribute("text-anchor", anchor);
      text.textContent = show(tok.text);
      if (i === state.selected) text.classList.add("selected");
      text.addEventListener("click", () => select(i));
      svg.appendChild(text);
    }
  });
}

function drawHeatmap(w, T) {
  const canvas = $("heatmap");
  const cell = Math.max(4, Math.min(24, Math.floor(560 / T)));
  canvas.width = canvas.height = T * cell;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  for (let q = 0; q < T; q++) {
    for (let k = 0; k <= q; k++) {
      const a = w[q * T + k];
      const v = Math.round(255 * (1 - a));
      ctx.fillStyle = `rgb(${v}, ${v}, 255)`;
      ctx.fillRect(k * cell, q * cell, cell, cell);
    }
  }
  if (state.selected !== null) {
    ctx.strokeStyle = "#e03131";
    ctx.lineWidth = 2;
    ctx.strokeRect(1, state.selected * cell + 1, canvas.width - 2, cell - 2);
  }
}

function drawLens() {
  const table = $("lens");
  table.innerHTML = "";
  const lens = state.resp.logit_lens || [];
  if (!lens.length) return;
  const head = document.createElement("tr");
  head.appendChild(document.createElement("th")).textContent = "depth";
  state.resp.tokens.forEach((tok) => { head.appendChild(document.createElement("th")).textContent = show(tok.text); });
  table.appendChild(head);
  lens.forEach((row) => {
    const tr = document.createElement("tr");
    const depth = row.layer || 0;
    tr.appendChild(document.createElement("th")).textContent = depth === 0 ? "emb" : `after ${depth}`;
    (row.tokens || []).forEach((token, t) => {
      const td = document.createElement("td");
      const p = row.probs[t];
      td.textContent = show(token);
      td.title = `p=${p.toPrecision(3)}`;
      td.style.background = `rgba(59, 91, 219, ${(0.6 * p).toFixed(3)})`;
      tr.appendChild(td);
    });
    table.appendChild(tr);
  });
}

function select(t) {
  state.selected = state.selected === t ? null : t;
  document.querySelectorAll(".token").forEach((s) => s.classList.toggle("selected", Number(s.dataset.index) === state.selected));
  drawNext(state.selected === null ? t : state.selected);
  drawAttention();
}

function fillSelect(select, values, label) {
  select.innerHTML = "";
  values.forEach((v, i) => {
    const opt = document.createElement("option");
    opt.value = i;
    opt.textContent = label(v);
    select.appendChild(opt);
  });
}

// --- the form ----------------------------------------------------------------------------------
async function run(event) {
  event.preventDefault();
  $("error").hidden = true;
  $("status").textContent = "inspecting...";
  try {
    const resp = await api("/v1/inspect", {
      model: $("model").value, text: $("text").value, top_k: Number($("topk").value) || 5,
      attention: true, logit_lens: true,
    });
    state.resp = resp;
    state.attention = (resp.attention || []).map(unpackAttention);
    state.selected = null;
    fillSelect($("layer"), state.attention, (a) => `${a.layer}`);
    fillSelect($("head"), state.attention.length ? state.attention[0].heads : [], (h) => `${h}`);
    $("result").hidden = false;
    drawTokens();
    drawNext(0);
    drawAttention();
    drawLens();
    $("status").textContent = `${resp.model}: ${resp.tokens.length} tokens, ${resp.n_layer} layers x ${resp.n_head} heads`;
  } catch (e) {
    $("error").textContent = e.message;
    $("error").hidden = false;
    $("status").textContent = "";
  }
}

$("form").addEventListener("submit", run);
$("layer").addEventListener("change", drawAttention);
$("head").addEventListener("change", drawAttention);
document.querySelectorAll("input[name=view]").forEach((r) => r.addEventListener("change", drawAttention));

function listModels() {
  $("error").hidden = true;
  loadModels().catch((e) => { $("error").textContent = `could not list models: ${e.message}`; $("error").hidden = false; });
}
$("apikey").addEventListener("change", listModels);
listModels();
