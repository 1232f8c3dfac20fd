// attnscope view: one page over one store. Every number drawn comes from the server's JSON
// (/api/...), or, in an exported file, from the same answers embedded in it.
"use strict";

const MEAN = "mean";
const RESTING_MS = 250; // how long the sliders rest before the slower panels are asked for
// frame: a video run's latent frame (null for an image run, whose maps have none)
const state = { run: null, direction: null, span: null, step: MEAN, layer: MEAN, head: MEAN, frame: MEAN };
let meta = null;
let lockedMax = null;
const masks = new Map(); // EliGen entity masks by name
let drawn = 0; // the latest update: answers to older ones are not drawn
const drifts = new Map(); // drift curves by their selection: a step move does not change them
let anchor = null; // the first token of a shift-click range

const $ = (id) => document.getElementById(id);

function queryKey(path, params) {
  const keys = Object.keys(params).filter((k) => params[k] !== null).sort();
  return path + "?" + keys.map((k) => `${k}=${encodeURIComponent(params[k])}`).join("&");
}

async function api(path, params) {
  const exported = window.ATTNSCOPE_EXPORT;
  if (exported) {
    const answer = exported.answers[queryKey(path, params)];
    if (answer === undefined) {
      throw new Error("this exported view holds one slider off its mean at a time; move the " +
        "others back to mean (or open the store with attnscope view)");
    }
    return answer;
  }
  const response = await fetch(queryKey(path, params));
  const body = await response.json();
  if (!response.ok) {
    const error = new Error(body.error || `HTTP ${response.status}`);
    error.damaged = Boolean(body.damaged);
    throw error;
  }
  return body;
}

function showError(error) {
  const box = $("error");
  box.hidden = error === null;
  box.textContent = error === null ? "" : (error.damaged ? "damaged data: " : "") + error.message;
  $("stack").classList.toggle("damaged", Boolean(error && error.damaged));
}

// -- drawing --------------------------------------------------------------------------------

function paint(canvas, values, low, high) {
  const rows = values.length, cols = values[0].length;
  canvas.width = cols;
  canvas.height = rows;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(cols, rows);
  const span = high > low ? high - low : 1;
  for (let y = 0; y < rows; y++) {
    for (let x = 0; x < cols; x++) {
      const v = values[y][x];
      const at = 4 * (y * cols + x);
      if (v === null) { pixels.data[at + 3] = 0; continue; }
      const rgb = meta.colormap[Math.max(0, Math.min(255, Math.round(255 * (v - low) / span)))];
      pixels.data.set([rgb[0], rgb[1], rgb[2], 255], at);
    }
  }
  context.putImageData(pixels, 0, 0);
}

function paintMask(values) {
  // An entity's mask over the map when its span is shown: where the model applied it.
  const canvas = $("mask");
  if (!values) { canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height); return; }
  canvas.width = values[0].length;
  canvas.height = values.length;
  const context = canvas.getContext("2d");
  const pixels = context.createImageData(canvas.width, canvas.height);
  values.forEach((row, y) => row.forEach((v, x) => {
    if (v) pixels.data.set([0, 220, 255, 255], 4 * (y * canvas.width + x));
  }));
  context.putImageData(pixels, 0, 0);
}

function paintColorbar(low, high) {
  const bar = $("colorbar").getContext("2d");
  meta.colormap.forEach((rgb, i) => {
    bar.fillStyle = `rgb(${rgb[0]},${rgb[1]},${rgb[2]})`;
    bar.fillRect(i, 0, 1, 12);
  });
  $("scale").textContent = `scale ${low.toPrecision(3)} … ${high.toPrecision(3)}`;
}

function paintDrift(drift) {
  const canvas = $("drift"), context = canvas.getContext("2d");
  context.clearRect(0, 0, canvas.width, canvas.height);
  const finite = drift.filter((v) => v !== null);
  const top = Math.max(...finite, 1e-12), n = drift.length;
  const px = (i) => 20 + (n > 1 ? i / (n - 1) : 0) * (canvas.width - 30);
  const py = (v) => canvas.height - 15 - (v / top) * (canvas.height - 30);
  context.strokeStyle = "#555";
  context.beginPath();
  drift.forEach((v, i) => { if (v !== null) context[i ? "lineTo" : "moveTo"](px(i), py(v)); });
  context.stroke();
  if (state.step !== MEAN) {
    context.fillStyle = "#d33";
    const v = drift[Number(state.step)];
    if (v !== null) context.fillRect(px(Number(state.step)) - 3, py(v) - 3, 6, 6);
  }
  context.fillStyle = "#333";
  context.fillText(top.toPrecision(2), 0, 12);
}

// -- state ----------------------------------------------------------------------------------

function readUrl() {
  const exported = window.ATTNSCOPE_EXPORT;
  const query = new URLSearchParams(exported ? exported.state : window.location.search);
  for (const key of Object.keys(state)) if (query.has(key)) state[key] = query.get(key);
}

function writeUrl() {
  if (window.ATTNSCOPE_EXPORT) return;
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(state)) if (value !== null) query.set(key, value);
  window.history.replaceState(null, "", "?" + query.toString());
}

function sliderPosition(dim) {
  const slider = $(dim);
  return Number(slider.value) === Number(slider.max) ? MEAN : String(slider.value);
}

function setSlider(dim, labels) {
  const slider = $(dim);
  slider.max = String(labels.length); // the last position is the mean
  slider.value = state[dim] === MEAN ? slider.max : state[dim];
  $(`${dim}-label`).value = state[dim] === MEAN ? MEAN : labels[Number(state[dim])];
}

function selection() {
  return { run: state.run, direction: state.direction, span: state.span };
}

// -- updates --------------------------------------------------------------------------------

async function drawMap(update) {
  const params = { ...selection(), step: state.step, layer: state.layer, head: state.head, frame: state.frame };
  const answer = await api("api/map", params);
  if (update !== drawn) return;
  const low = 0, high = $("lock").checked && lockedMax !== null ? lockedMax : answer.max || 1;
  lockedMax = high;
  paint($("map"), answer.values, low, high);
  paintMask(masks.get(state.span));
  paintColorbar(low, high);
  $("map").dataset.values = JSON.stringify(answer.values);
}

async function drawDrift(update) {
  const params = { ...selection(), layer: state.layer, head: state.head, frame: state.frame };
  const key = queryKey("api/drift", params);
  if (!drifts.has(key)) drifts.set(key, api("api/drift", params));
  let drift;
  try {
    drift = (await drifts.get(key)).drift;
  } catch (error) {
    drifts.delete(key);
    throw error;
  }
  if (update === drawn) paintDrift(drift);
}

async function drawHeads(update) {
  if ($("grid-body").hidden) return;
  const answer = await api("api/heads", { ...selection(), step: state.step, layer: state.layer, frame: state.frame });
  if (update !== drawn) return;
  const grid = $("grid");
  grid.replaceChildren();
  answer.maps.forEach((values, head) => {
    const figure = document.createElement("figure");
    const canvas = document.createElement("canvas");
    paint(canvas, values, 0, answer.max || 1);
    canvas.addEventListener("click", () => { state.head = String(head); update(); });
    figure.append(canvas, `head ${meta.heads[head]}`);
    grid.append(figure);
  });
  paint($("similarity"), answer.similarity, -1, 1);
}

async function update() {
  const current = ++drawn;
  writeUrl();
  for (const [dim, labels] of [["step", meta.steps], ["layer", meta.layers], ["head", meta.heads]]) {
    setSlider(dim, labels);
  }
  if (state.frame !== null) setSlider("frame", meta.frames);
  markTokens();
  const failed = (error) => {
    if (current !== drawn) return;
    showError(error);
    $("map").getContext("2d").clearRect(0, 0, $("map").width, $("map").height);
  };
  try {
    await drawMap(current);
    showError(null);
  } catch (error) {
    failed(error);
    return;
  }
  // The map first; the drift curve and the head grid follow once the sliders rest, so scrubbing
  // asks the server for maps only.
  await new Promise((resolve) => setTimeout(resolve, window.ATTNSCOPE_EXPORT ? 0 : RESTING_MS));
  if (current !== drawn) return;
  await Promise.all([drawDrift(current), drawHeads(current)]).catch(failed);
}

// -- the prompt -----------------------------------------------------------------------------

function spanOf(token) {
  return `${token.position}:${token.position + token.count}`;
}

function spanPositions() {
  const range = /^(\d+):(\d+)$/.exec(state.span || "");
  if (range) {
    const first = Number(range[1]);
    return Array.from({ length: Number(range[2]) - first }, (_, i) => first + i);
  }
  const named = meta.run.spans[state.span];
  return named ? named.tokens : [];
}

function markTokens() {
  $("span").value = state.span;
  const chosen = new Set(spanPositions());
  for (const chip of $("tokens").children) {
    const first = Number(chip.dataset.position), count = Number(chip.dataset.count);
    let hit = false;
    for (let p = first; p < first + count; p++) hit = hit || chosen.has(p);
    chip.classList.toggle("chosen", hit);
  }
}

function layOut() {
  $("where").textContent = meta.store;
  $("run").replaceChildren(...meta.runs.map((r) => new Option(`${r.name} (${r.status})`, r.name)));
  $("run").value = meta.run.name;
  state.run = meta.run.name;
  const tokens = $("tokens");
  tokens.replaceChildren(...meta.run.tokens.map((token) => {
    const chip = document.createElement("span");
    chip.textContent = token.count > 1 ? `${token.text}×${token.count}` : token.text;
    chip.dataset.position = token.position;
    chip.dataset.count = token.count;
    chip.title = `${token.segment} ${spanOf(token)}`;
    if (token.count > 1) chip.classList.add("padding");
    chip.addEventListener("click", (event) => {
      if (event.shiftKey && anchor !== null) {
        const first = Math.min(anchor.position, token.position);
        const last = Math.max(anchor.position + anchor.count, token.position + token.count);
        state.span = `${first}:${last}`;
      } else {
        anchor = token;
        state.span = spanOf(token);
      }
      update();
    });
    return chip;
  }));
  $("spans").replaceChildren(...Object.keys(meta.run.spans).map((name) => {
    const button = document.createElement("button");
    button.textContent = name;
    button.addEventListener("click", () => { state.span = name; update(); });
    return button;
  }));
  masks.clear();
  $("entities").replaceChildren(...meta.run.entities.map((name) => {
    const figure = document.createElement("figure");
    const canvas = document.createElement("canvas");
    figure.title = `entity ${name}: its span, with its mask over the map`;
    figure.append(canvas, ` ${name}`);
    figure.addEventListener("click", () => { state.span = name; update(); });
    api("api/entity", { run: state.run, entity: name }).then((answer) => {
      masks.set(name, answer.values);
      paint(canvas, answer.values, 0, 1);
      if (state.span === name) paintMask(answer.values);
    }).catch(showError);
    return figure;
  }));
  const directions = $("directions");
  directions.replaceChildren(directions.firstElementChild);
  for (const name of ["txt2img", "img2txt"]) {
    const label = document.createElement("label");
    const radio = Object.assign(document.createElement("input"), { type: "radio", name: "direction", value: name });
    radio.disabled = !meta.directions.includes(name);
    radio.checked = name === state.direction;
    label.title = meta.directions_absent[name] || "";
    radio.addEventListener("change", () => { state.direction = name; update(); });
    label.append(radio, ` ${name}`);
    directions.append(label);
  }
  const image = $("image");
  image.hidden = !meta.has_image;
  if (meta.has_image) {
    image.src = window.ATTNSCOPE_EXPORT ? window.ATTNSCOPE_EXPORT.image : `api/image?run=${meta.run.name}`;
  }
}

async function load() {
  try {
    meta = await api("api/meta", { run: state.run });
  } catch (error) {
    showError(error);
    return;
  }
  if (!meta.directions.includes(state.direction)) state.direction = meta.directions[0];
  // The final step first, where the image has formed (a mean over every step reads them all).
  if (!new URLSearchParams(window.location.search).has("step") && !window.ATTNSCOPE_EXPORT) {
    state.step = String(meta.steps.length - 1);
  }
  if (state.span === null) state.span = Object.keys(meta.run.spans)[0];
  // A video run's frames: their mean first; an image run has no frame to choose.
  state.frame = meta.frames.length ? (state.frame ?? MEAN) : null;
  $("frame-control").hidden = !meta.frames.length;
  layOut();
  await update();
}

function wire() {
  for (const dim of ["step", "layer", "head", "frame"]) {
    $(dim).addEventListener("input", () => { state[dim] = sliderPosition(dim); update(); });
  }
  $("span").addEventListener("change", () => { state.span = $("span").value.trim(); update(); });
  $("run").addEventListener("change", () => { state.run = $("run").value; load(); });
  $("opacity").addEventListener("input", () => { $("map").style.opacity = $("opacity").value / 100; });
  $("map").style.opacity = $("opacity").value / 100;
  $("lock").addEventListener("change", () => update());
  $("grid-toggle").addEventListener("click", () => {
    $("grid-body").hidden = !$("grid-body").hidden;
    $("grid-toggle").textContent = $("grid-body").hidden ? "show" : "hide";
    update();
  });
  $("map").addEventListener("mousemove", (event) => {
    const values = JSON.parse($("map").dataset.values || "null");
    if (!values) return;
    const box = $("map").getBoundingClientRect();
    const y = Math.floor(((event.clientY - box.top) / box.height) * values.length);
    const x = Math.floor(((event.clientX - box.left) / box.width) * values[0].length);
    const v = values[y] && values[y][x];
    $("cursor").textContent = v === undefined ? "" : `y ${y} x ${x}: ${v === null ? "not computed" : v.toPrecision(4)}`;
  });
}

readUrl();
wire();
load();
