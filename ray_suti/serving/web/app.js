// The ray-suti page: register a subject, pick one, draw it as a prompt says, with step progress
// (server-sent events from POST v1/generate). Plain browser JavaScript, no build step. Every call
// carries the API key from the token field (kept in this browser's localStorage).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { subject: null, controls: [], box: null, points: [], drag: null };

function headers(extra = {}) {
  const token = $("token").value.trim();
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (response.status === 401) {
    $("token-box").hidden = false;
    $("token").focus();
    throw new Error("This server wants an API key: paste it in the key field.");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(`${response.status}: ${detail}`);
  }
  return response;
}

async function connect() {
  try {
    const model = await (await api("v1/model")).json();
    $("model").textContent = `${model.preset} · ${model.device} · ${model.dtype} · ${model.scheduler}`;
    state.controls = model.controls || [];
    $("controls").hidden = !state.controls.some((c) => c === "box" || c === "keypoints");
    $("edges-box").hidden = !state.controls.includes("edges");
    $("kb-box").hidden = !model.knowledge_base;
    showError("");
    await loadSubjects();
  } catch (e) {
    $("model").textContent = "not connected";
    showError(e.message);
  }
  updateButtons();
}

// ---- subjects -------------------------------------------------------------------------------

async function thumbnail(id, index) {
  const blob = await (await api(`v1/subjects/${id}/images/${index}?size=112`)).blob();
  const img = document.createElement("img");
  img.src = URL.createObjectURL(blob);
  img.alt = `photo ${index + 1}`;
  return img;
}

async function loadSubjects() {
  const { subjects } = await (await api("v1/subjects?limit=100")).json();
  const list = $("subjects");
  list.replaceChildren();
  $("no-subjects").hidden = subjects.length > 0;
  if (state.subject && !subjects.some((s) => s.subject_id === state.subject)) state.subject = null;
  for (const s of subjects.sort((a, b) => b.created - a.created)) {
    const item = document.createElement("li");
    item.className = "subject" + (s.subject_id === state.subject ? " selected" : "");
    item.dataset.id = s.subject_id;
    const thumbs = document.createElement("div");
    thumbs.className = "thumbs";
    const name = document.createElement("code");
    name.textContent = s.subject_id.slice(0, 8);
    name.title = s.subject_id;
    const remove = document.createElement("button");
    remove.className = "delete link";
    remove.textContent = "delete";
    remove.onclick = (event) => { event.stopPropagation(); deleteSubject(s.subject_id); };
    item.append(thumbs, name, remove);
    item.onclick = () => selectSubject(s.subject_id);
    list.append(item);
    for (let i = 0; i < Math.min(s.num_images, 3); i++) thumbs.append(await thumbnail(s.subject_id, i));
  }
}

function selectSubject(id) {
  state.subject = id;
  for (const item of document.querySelectorAll(".subject")) item.classList.toggle("selected", item.dataset.id === id);
  updateButtons();
}

async function registerPhotos() {
  const files = [...$("photos").files];
  if (files.length < 1 || files.length > 5) throw new Error("Choose 1 to 5 photos.");
  const form = new FormData();
  for (const f of files) form.append("images", f, f.name);
  const { subject_id } = await (await api("v1/subjects", { method: "POST", body: form })).json();
  $("photos").value = "";
  $("previews").replaceChildren();
  state.subject = subject_id;
  await loadSubjects();
  updateButtons();
  return subject_id;
}

async function deleteSubject(id) {
  try {
    await api(`v1/subjects/${id}`, { method: "DELETE" });
    if (state.subject === id) state.subject = null;
    await loadSubjects();
    showError("");
  } catch (e) { showError(e.message); }
  updateButtons();
}

function showPreviews() {
  const files = [...$("photos").files];
  $("previews").replaceChildren(...files.slice(0, 5).map((f) => {
    const img = document.createElement("img");
    img.src = URL.createObjectURL(f);
    return img;
  }));
  showError(files.length > 5 ? "At most 5 photos: keep the best ones." : "");
  updateButtons();
}

function retrieving() { return !$("kb-box").hidden && $("use-kb").checked; }

function updateButtons() {
  const picked = $("photos").files.length;
  $("register").disabled = picked < 1 || picked > 5;
  $("generate").disabled = !(retrieving() || state.subject || (picked >= 1 && picked <= 5)) || !$("prompt").value.trim();
}

// ---- layout controls ------------------------------------------------------------------------

function drawLayout() {
  const canvas = $("layout"), ctx = canvas.getContext("2d"), w = canvas.width;
  ctx.clearRect(0, 0, w, w);
  ctx.lineWidth = 2;
  if (state.box) {
    const [x0, y0, x1, y1] = state.box.map((v) => v * w);
    ctx.strokeStyle = "#2f6fed";
    ctx.fillStyle = "rgba(47, 111, 237, 0.15)";
    ctx.fillRect(x0, y0, x1 - x0, y1 - y0);
    ctx.strokeRect(x0, y0, x1 - x0, y1 - y0);
  }
  state.points.forEach(([x, y], i) => {
    ctx.fillStyle = i === 0 ? "#d33" : "#2a2";
    ctx.beginPath();
    ctx.arc(x * w, y * w, 5, 0, 2 * Math.PI);
    ctx.fill();
  });
}

function canvasPoint(event) {
  const rect = $("layout").getBoundingClientRect();
  const clamp = (v) => Math.min(1, Math.max(0, v));
  return [clamp((event.clientX - rect.left) / rect.width), clamp((event.clientY - rect.top) / rect.height)];
}

function drawMode() { return document.querySelector("input[name=draw]:checked").value; }

function setUpLayout() {
  const canvas = $("layout");
  canvas.onmousedown = (event) => {
    if (drawMode() === "box") state.drag = canvasPoint(event);
    else {
      if (state.points.length === 2) state.points = [];
      state.points.push(canvasPoint(event));
      drawLayout();
    }
  };
  canvas.onmousemove = (event) => {
    if (!state.drag) return;
    const [a, b] = [state.drag, canvasPoint(event)];
    state.box = [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]), Math.max(a[1], b[1])];
    drawLayout();
  };
  window.addEventListener("mouseup", () => {
    if (state.drag && state.box && (state.box[2] - state.box[0] < 0.02 || state.box[3] - state.box[1] < 0.02)) state.box = null;
    state.drag = null;
    drawLayout();
  });
  $("clear-layout").onclick = () => { state.box = null; state.points = []; drawLayout(); };
}

// ---- generation -----------------------------------------------------------------------------

function fileBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.split(",", 2)[1]);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function requestBody() {
  const number = (id) => Number($(id).value);
  const body = {
    prompt: $("prompt").value.trim(), steps: number("steps"),
    num_images: number("num-images"), guidance_text: number("guidance-text"), guidance_subject: number("guidance-subject"),
  };
  if (retrieving()) body.retrieve = { k: 3 };
  else body.subject_id = state.subject;
  if ($("seed").value !== "") body.seed = number("seed");
  if (!$("controls").hidden) {
    if (state.box && state.controls.includes("box")) body.box = state.box.map((v) => Math.round(v * 1000) / 1000);
    if (state.points.length === 2 && state.controls.includes("keypoints")) body.keypoints = state.points;
  }
  if (!$("edges-box").hidden && $("edges").files.length) body.edges = await fileBase64($("edges").files[0]);
  return body;
}

function setProgress(step, steps, text) {
  $("progress").hidden = steps === 0;
  $("progress").max = steps || 1;
  $("progress").value = step;
  $("progress-text").textContent = text;
}

// Server-sent events over a POST: "progress" {step, steps} while sampling, then "result" or "error".
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const event = /^event: (.*)$/m.exec(block), data = /^data: (.*)$/m.exec(block);
      if (event && data) yield [event[1], JSON.parse(data[1])];
    }
  }
}

function showResult(result, prompt) {
  for (const b64 of result.images) {
    const figure = document.createElement("figure");
    const img = document.createElement("img");
    img.src = `data:image/png;base64,${b64}`;
    img.alt = prompt;
    img.onload = () => { if (img.naturalWidth >= 128) img.style.imageRendering = "auto"; };
    const caption = document.createElement("figcaption");
    caption.textContent = `“${prompt}” · seed ${result.seed} · ${result.timings.total_s.toFixed(1)} s`;
    if (result.neighbours) {  // Re-Imagen: the knowledge-base entries that were the demos
      const used = document.createElement("ul");
      used.className = "neighbours";
      for (const n of result.neighbours) {
        const item = document.createElement("li");
        item.textContent = `${n.caption || "(no caption)"} · ${n.score.toFixed(2)}`;
        item.title = `${n.id} on ${n.page}`;
        used.append(item);
      }
      caption.append(used);
    }
    figure.append(img, caption);
    $("results").prepend(figure);
  }
}

async function generate() {
  $("generate").disabled = true;
  showError("");
  try {
    if (!retrieving() && (!state.subject || $("photos").files.length)) await registerPhotos();
    const body = await requestBody();
    setProgress(0, body.steps, "waiting for the model...");
    const response = await api("v1/generate", {
      method: "POST", body: JSON.stringify(body),
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
    });
    for await (const [kind, data] of events(response)) {
      if (kind === "progress") setProgress(data.step, data.steps, `step ${data.step} of ${data.steps}`);
      else if (kind === "result") { showResult(data, body.prompt); setProgress(0, 0, ""); }
      else if (kind === "error") throw new Error(`${data.status}: ${data.detail}`);
    }
  } catch (e) {
    setProgress(0, 0, "");
    showError(e.message);
  }
  updateButtons();
}

function guard(fn) {
  return async () => { try { showError(""); await fn(); } catch (e) { showError(e.message); } updateButtons(); };
}

$("token").value = localStorage.getItem("suti-token") || "";
$("token-box").hidden = !$("token").value;
$("token").onchange = () => { localStorage.setItem("suti-token", $("token").value.trim()); connect(); };
$("photos").onchange = showPreviews;
$("prompt").oninput = updateButtons;
$("use-kb").onchange = updateButtons;
$("register").onclick = guard(registerPhotos);
$("refresh").onclick = guard(loadSubjects);
$("generate").onclick = generate;
setUpLayout();
connect();
