// The blipkit page: one image, every task of the API on it. Plain JavaScript, no build step, no network but the server.
"use strict";

const $ = (id) => document.getElementById(id);
const BOX_COLOURS = ["#ff2d2d", "#1e90ff", "#ffd700", "#32cd32", "#ff8c00", "#da70d6", "#00ced1", "#ffffff"];
const SIDE = 384; // longest side of the picture on the page, in CSS pixels

const state = { file: null, bitmap: null, width: 0, height: 0, heat: null };

// ------------------------------------------------------------------------------------------------ requests

function headers() {
  const key = $("api-key").value || localStorage.getItem("blipkit-api-key") || "";
  return key ? { "X-API-Key": key } : {};
}

// POST `fields` (and the current image unless `image` is false) as multipart form data; the JSON, or an Error.
async function api(path, fields, image = true) {
  const form = new FormData();
  if (image) {
    if (!state.file) throw new Error("pick an image first");
    form.append("image", state.file, state.file.name || "image");
  }
  for (const [name, value] of Object.entries(fields)) {
    for (const v of Array.isArray(value) ? value : [value]) form.append(name, String(v));
  }
  const response = await fetch(path, { method: "POST", body: form, headers: headers() });
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (response.status === 401) $("key-box").hidden = false;
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function status(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

// Run `work` with `button` disabled, showing an error in `target` (or the status line).
async function busy(button, target, work) {
  button.disabled = true;
  if (target) target.classList.remove("error");
  try {
    await work();
  } catch (e) {
    if (target) {
      target.textContent = e.message;
      target.classList.add("error");
    } else status(e.message, true);
  } finally {
    button.disabled = false;
  }
}

// ------------------------------------------------------------------------------------------------ the image

async function useFile(file) {
  if (!file) return;
  let bitmap;
  try {
    bitmap = await createImageBitmap(file, { imageOrientation: "from-image" });
  } catch {
    status(`${file.name}: the browser cannot read this file as an image`, true);
    return;
  }
  Object.assign(state, { file, bitmap, width: bitmap.width, height: bitmap.height, heat: null });
  const scale = SIDE / Math.max(bitmap.width, bitmap.height);
  const w = Math.round(bitmap.width * scale), h = Math.round(bitmap.height * scale);
  for (const canvas of [$("picture"), $("overlay")]) {
    canvas.width = w;
    canvas.height = h;
  }
  $("stage").style.width = `${w}px`;
  $("stage").style.height = `${h}px`;
  $("picture").getContext("2d").drawImage(bitmap, 0, 0, w, h);
  clearOverlay();
  $("stage").hidden = false;
  $("drop-hint").hidden = true;
  $("image-info").textContent = `${file.name} · ${bitmap.width}×${bitmap.height} ·`;
  $("pick-another").hidden = false;
  $("search-image").disabled = false;
  status("");
  for (const id of ["answer", "ground-list", "attention-grid", "attention-info"]) $(id).textContent = "";
  $("match-table").hidden = true;
  await Promise.all([caption(), match()]);
}

function clearOverlay() {
  const o = $("overlay");
  o.getContext("2d").clearRect(0, 0, o.width, o.height);
}

// ------------------------------------------------------------------------------------------------ tasks

async function caption() {
  const out = $("caption");
  out.textContent = "…";
  out.classList.remove("error");
  try {
    const r = await api("/api/caption", {});
    const c = r.results[0];
    out.textContent = c.caption ?? c.captions.join(" | ");
  } catch (e) {
    out.textContent = e.message;
    out.classList.add("error");
  }
}

async function match() {
  const texts = $("match-texts").value.split("\n").map((t) => t.trim()).filter(Boolean);
  if (!texts.length || !state.file) return;
  const table = $("match-table");
  await busy($("match-run"), null, async () => {
    const r = await api("/api/match", { texts });
    const rows = r.results[0].matches;
    const best = Math.max(...rows.map((m) => m.itm ?? m.itc));
    const body = table.querySelector("tbody");
    body.textContent = "";
    for (const m of rows) {
      const tr = body.insertRow();
      if ((m.itm ?? m.itc) === best) tr.className = "best";
      tr.insertCell().textContent = m.text;
      for (const v of [m.itc, m.itm]) {
        const td = tr.insertCell();
        td.className = "num";
        td.textContent = v == null ? "–" : v.toFixed(3);
        if (v != null) {
          const bar = document.createElement("div");
          bar.className = "bar";
          bar.style.width = `${Math.max(0, Math.min(1, v)) * 100}%`;
          td.append(bar);
        }
      }
    }
    table.hidden = false;
  });
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim() || $("question").placeholder;
  $("question").value = question;
  await busy($("ask-run"), $("answer"), async () => {
    $("answer").textContent = "…";
    const r = await api("/api/ask", { question });
    $("answer").textContent = r.results[0].answer;
  });
}

async function ground(event) {
  event.preventDefault();
  const phrases = $("phrases").value.split(";").map((t) => t.trim()).filter(Boolean);
  const list = $("ground-list");
  await busy($("ground-run"), list, async () => {
    const r = await api("/api/ground", { phrases });
    clearOverlay();
    list.textContent = "";
    const o = $("overlay"), ctx = o.getContext("2d");
    ctx.lineWidth = 3;
    ctx.font = "bold 14px system-ui, sans-serif";
    r.results.forEach((g, i) => {
      const colour = BOX_COLOURS[i % BOX_COLOURS.length];
      const [x1, y1, x2, y2] = g.box;
      ctx.strokeStyle = colour;
      ctx.strokeRect(x1 * o.width, y1 * o.height, (x2 - x1) * o.width, (y2 - y1) * o.height);
      const label = `${g.phrase} ${g.match.toFixed(2)}`;
      const ty = y1 * o.height > 18 ? y1 * o.height - 5 : y2 * o.height + 15;
      ctx.fillStyle = "rgba(0, 0, 0, 0.6)";
      ctx.fillRect(x1 * o.width, ty - 13, ctx.measureText(label).width + 6, 17);
      ctx.fillStyle = colour;
      ctx.fillText(label, x1 * o.width + 3, ty);
      const li = document.createElement("li");
      li.className = "box";
      li.innerHTML = `<span class="swatch" style="background:${colour}"></span>`;
      li.append(`${g.phrase}: [${g.box.map((v) => v.toFixed(2)).join(", ")}], match ${g.match.toFixed(3)}`);
      list.append(li);
    });
  });
}

// Jet colour map, as the CLI's pictures use: v in [0, 1] -> [r, g, b].
function jet(v) {
  const c = (x) => Math.round(255 * Math.max(0, Math.min(1, x)));
  return [c(1.5 - Math.abs(4 * v - 3)), c(1.5 - Math.abs(4 * v - 2)), c(1.5 - Math.abs(4 * v - 1))];
}

// Draw a (gh, gw) map over the picture on `canvas`: the image in grey, the map stretched over it, half transparent.
function drawHeat(canvas, map, grey = true) {
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (grey) {
    ctx.filter = "grayscale(1)";
    ctx.drawImage(state.bitmap, 0, 0, canvas.width, canvas.height);
    ctx.filter = "none";
  }
  const gh = map.length, gw = map[0].length, flat = map.flat();
  const lo = Math.min(...flat), hi = Math.max(...flat);
  const small = document.createElement("canvas");
  small.width = gw;
  small.height = gh;
  const pixels = small.getContext("2d").createImageData(gw, gh);
  flat.forEach((v, i) => {
    const [r, g, b] = jet(hi > lo ? (v - lo) / (hi - lo) : 0);
    pixels.data.set([r, g, b, 255], 4 * i);
  });
  small.getContext("2d").putImageData(pixels, 0, 0);
  ctx.globalAlpha = 0.5;
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(small, 0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = 1;
}

async function attention(event) {
  event.preventDefault();
  const grid = $("attention-grid");
  await busy($("attention-run"), $("attention-info"), async () => {
    const r = await api("/api/attention", { text: $("attention-text").value.trim() });
    $("attention-info").textContent = `${r.part} layer ${r.layer}, heads averaged · click a token to lay it on the image`;
    grid.textContent = "";
    r.tokens.forEach((token, i) => {
      if (r.special[i]) return;
      const figure = document.createElement("figure");
      const canvas = document.createElement("canvas");
      canvas.width = 128;
      canvas.height = Math.round((128 * state.height) / state.width);
      drawHeat(canvas, r.heat[i]);
      const label = document.createElement("figcaption");
      label.textContent = token;
      figure.append(canvas, label);
      figure.addEventListener("click", () => {
        grid.querySelectorAll("figure").forEach((f) => f.classList.remove("on"));
        figure.classList.add("on");
        drawHeat($("overlay"), r.heat[i], false);
      });
      grid.append(figure);
    });
  });
}

async function search(byImage) {
  const grid = $("search-grid");
  const button = byImage ? $("search-image") : $("search-run");
  await busy(button, null, async () => {
    const fields = byImage ? { k: 12 } : { text: $("search-text").value.trim(), k: 12 };
    const r = await api("/api/search", fields, byImage);
    grid.textContent = "";
    for (const hit of r.results) {
      const figure = document.createElement("figure");
      const img = document.createElement("img");
      img.alt = hit.path || hit.key || "";
      if (hit.thumbnail) img.src = hit.thumbnail;
      const label = document.createElement("figcaption");
      const name = (hit.path || hit.key || "").split("/").pop();
      label.textContent = `${hit.score.toFixed(3)} · ${name}`;
      label.title = hit.path || "";
      figure.append(img, label);
      grid.append(figure);
    }
    status(`${r.results.length} hits`);
  });
}

// ------------------------------------------------------------------------------------------------ wiring

async function start() {
  const key = localStorage.getItem("blipkit-api-key");
  if (key) $("api-key").value = key;
  $("api-key").addEventListener("change", () => {
    localStorage.setItem("blipkit-api-key", $("api-key").value);
    start();
  });
  const response = await fetch("/api/models", { headers: headers() });
  if (response.status === 401) {
    $("key-box").hidden = false;
    $("model-name").textContent = "this server needs an API key";
    return;
  }
  const info = await response.json();
  const can = info.model.capabilities;
  $("model-name").textContent = `${info.model.name} (${info.model.family})`;
  $("search-panel").hidden = !info.search;
  const off = { ask: "ask-form", ground: "ground-form", attention: "attention-form" };
  for (const [task, id] of Object.entries(off)) {
    if (!can[task]) $(id).closest("article").hidden = true;
  }
}

const drop = $("drop");
drop.addEventListener("dragover", (e) => {
  e.preventDefault();
  drop.classList.add("over");
});
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  useFile(e.dataTransfer.files[0]);
});
$("file").addEventListener("change", (e) => useFile(e.target.files[0]));
$("match-run").addEventListener("click", match);
$("ask-form").addEventListener("submit", ask);
$("ground-form").addEventListener("submit", ground);
$("attention-form").addEventListener("submit", attention);
$("search-form").addEventListener("submit", (e) => {
  e.preventDefault();
  search(false);
});
$("search-image").addEventListener("click", () => search(true));
start();
