"use strict";
// The difusion page: reads /api/info, posts /api/generate and follows its event stream.

const $ = (id) => document.getElementById(id);
const KEY = "difusion-key";
const LANG = "difusion-lang";
let info = null;
let controller = null; // aborts the running generation
const captions = []; // redraw each result's caption in the current language

// --- language: the one chosen here before, else the browser's first English or Spanish ---

let lang = "en";
const shown = new Map(); // element -> [key, ...args] of the message it shows, redrawn on a switch

function t(key, ...args) {
  const text = STRINGS[lang][key];
  return typeof text === "function" ? text(...args) : text;
}

// Shows a message of the page's own in `element`, in the current language and the next.
function say(element, key, ...args) {
  shown.set(element, [key, ...args]);
  element.textContent = t(key, ...args);
}

// Shows text the page did not write (the server's words), as it is.
function show(element, text) {
  shown.delete(element);
  element.textContent = text;
}

function browserLanguage() {
  for (const tag of navigator.languages || [navigator.language || ""]) {
    const base = tag.toLowerCase().split("-")[0];
    if (base in STRINGS) return base;
  }
  return "en";
}

function setLanguage(chosen) {
  lang = chosen in STRINGS ? chosen : "en";
  document.documentElement.lang = lang;
  for (const el of document.querySelectorAll("[data-text]")) el.textContent = t(el.dataset.text);
  for (const attr of ["placeholder", "title", "alt", "aria-label"]) {
    const data = "data-" + attr;
    for (const el of document.querySelectorAll(`[${data}]`)) {
      el.setAttribute(attr, t(el.getAttribute(data)));
    }
  }
  for (const button of document.querySelectorAll("#lang button")) {
    button.setAttribute("aria-pressed", String(button.dataset.lang === lang));
  }
  for (const [element, [key, ...args]] of shown) element.textContent = t(key, ...args);
  if (info) applyPromptHints();
  for (const redraw of captions) redraw();
}

function chooseLanguage(chosen) {
  localStorage.setItem(LANG, chosen);
  setLanguage(chosen);
}

// --- API key: from ?key= or #key=, kept for this tab only -------------------------------

function takeKeyFromUrl() {
  const query = new URLSearchParams(location.search);
  const hash = new URLSearchParams(location.hash.slice(1));
  const key = query.get("key") || hash.get("key");
  if (!key) return;
  sessionStorage.setItem(KEY, key);
  query.delete("key");
  hash.delete("key");
  const [q, h] = [query.toString(), hash.toString()];
  // out of the address bar and the history
  history.replaceState(null, "", location.pathname + (q ? "?" + q : "") + (h ? "#" + h : ""));
}

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

function askKey(detail) {
  $("auth").hidden = false;
  show($("auth-detail"), detail || "");
  $("key").focus();
}

function saveKey() {
  const key = $("key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY, key);
  $("key").value = "";
  show($("auth-detail"), "");
  loadInfo();
}

// --- messages ---------------------------------------------------------------------------

// The server's (or the browser's) words, as they are.
function showError(text) {
  show($("error"), text);
  $("error").hidden = false;
}

// The page's own words: a key of STRINGS and its arguments.
function sayError(key, ...args) {
  say($("error"), key, ...args);
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
  show($("error"), "");
}

// The server's {"detail": "..."} (FastAPI's list form too), or the status line.
async function refusal(response) {
  try {
    const detail = (await response.json()).detail;
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      return detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
    }
  } catch (err) {
    // not JSON
  }
  return `${response.status} ${response.statusText}`.trim();
}

// Returns false after showing why when the call was refused.
async function accepted(response) {
  if (response.ok) return true;
  const detail = await refusal(response);
  if (response.status === 401) askKey(detail);
  else showError(detail);
  return false;
}

// --- models -----------------------------------------------------------------------------

function currentModel() {
  return info.models.find((m) => m.name === $("model").value) || info.models[0];
}

function fillSelect(select, values, chosen) {
  select.replaceChildren(...values.map((v) => new Option(v, v, false, v === chosen)));
}

async function loadInfo() {
  let response;
  try {
    response = await fetch("/api/info", { headers: headers() });
  } catch (err) {
    sayError("unreachable", err.message);
    return;
  }
  if (!(await accepted(response))) return;
  info = await response.json();
  $("auth").hidden = true;
  const names = info.models.map((m) => m.name);
  fillSelect($("model"), names, info.default_model);
  $("model-field").hidden = names.length < 2;
  if (info.auth) say($("server-note"), "keyAccepted");
  else show($("server-note"), "");
  applyModel();
  $("generate").disabled = controller !== null;
  loadLoras();
}

// The server's LoRA files (--lora-dir), offered as AUTOMATIC1111's page does: a chosen one
// goes into the prompt as <lora:NAME:SCALE>. No list, or an empty one: no control.
async function loadLoras() {
  $("lora-field").setAttribute("aria-busy", "true");
  let names = [];
  try {
    const response = await fetch("/sdapi/v1/loras", { headers: headers() });
    const listed = response.ok ? await response.json() : [];
    if (Array.isArray(listed)) names = listed.map((l) => l.name).filter((n) => n);
  } catch (err) {
    // no list: the control stays hidden
  }
  const none = $("lora").options[0];
  $("lora").replaceChildren(none, ...names.map((n) => new Option(n, n)));
  $("lora-field").hidden = names.length === 0;
  $("lora-field").setAttribute("aria-busy", "false");
}

// " <lora:NAME:SCALE>" for the chosen LoRA, "" for none (an empty scale is 1).
function loraTag() {
  const name = $("lora-field").hidden ? "" : $("lora").value;
  if (!name) return "";
  const scale = $("lora-scale").value === "" ? 1 : Number($("lora-scale").value);
  return ` <lora:${name}:${Number.isFinite(scale) ? scale : 1}>`;
}

function applyModel() {
  const m = currentModel();
  fillSelect($("sampler"), m.samplers, m.default_sampler);
  fillSelect($("size"), m.sizes, m.default_size);
  $("size-field").hidden = m.sizes.length < 2;
  Object.assign($("steps"), { max: m.max_steps, value: m.default_steps });
  Object.assign($("n"), { max: m.max_n });
  if (+$("n").value > m.max_n) $("n").value = m.max_n;
  $("prompt").maxLength = m.max_prompt_chars;

  const [gmin, gmax] = m.guidance_range || [1, 30];
  Object.assign($("guidance"), { min: gmin, max: gmax, value: m.default_guidance ?? "" });

  const unconditional = m.kind === "unconditional";
  const label = m.kind === "label";
  $("prompt").disabled = unconditional;
  $("negative").disabled = m.kind !== "text";
  $("guidance").disabled = unconditional;
  $("prompt-note").hidden = !unconditional;
  $("class-field").hidden = !label;
  if (label) {
    const classes = m.classes || [];
    const choose = Object.assign(new Option(t("chooseClass"), ""), { id: "choose-class" });
    $("classes").replaceChildren(choose, ...classes.map((c) => new Option(c, c)));
  }
  applyPromptHints();
  $("upload").hidden = !m.takes_image;
}

// The hints that depend on the model's kind, in the current language.
function applyPromptHints() {
  const m = currentModel();
  say($("prompt-note"), "unconditional");
  if ($("choose-class")) $("choose-class").text = t("chooseClass");
  if (m.kind === "label") {
    $("prompt").placeholder = t("classHint", (m.classes || []).slice(0, 3).join(", "));
  } else {
    $("prompt").placeholder = m.kind === "unconditional" ? "" : t("promptHint");
  }
}

// --- uploads ----------------------------------------------------------------------------

function readDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function showThumb(input, thumb) {
  const file = input.files[0];
  if (thumb.src) URL.revokeObjectURL(thumb.src);
  thumb.hidden = !file;
  if (file) thumb.src = URL.createObjectURL(file);
  else thumb.removeAttribute("src");
}

function uploadChanged() {
  const hasImage = $("image").files.length > 0;
  $("strength").disabled = !hasImage;
  $("mask").disabled = !hasImage;
  if (!hasImage) $("mask").value = "";
  showThumb($("image"), $("image-thumb"));
  showThumb($("mask"), $("mask-thumb"));
  $("clear-upload").hidden = !hasImage;
}

function clearUpload() {
  $("image").value = "";
  $("mask").value = "";
  uploadChanged();
}

// --- generating -------------------------------------------------------------------------

// A number field's value; null when empty or disabled (the server then picks).
const number = (id) => ($(id).value === "" || $(id).disabled ? null : Number($(id).value));

async function requestBody() {
  const m = currentModel();
  const image = m.takes_image ? $("image").files[0] : undefined;
  const mask = image ? $("mask").files[0] : undefined;
  return {
    model: m.name,
    prompt: ($("prompt").disabled ? "" : $("prompt").value) + loraTag(),
    negative_prompt: $("negative").disabled ? "" : $("negative").value,
    steps: number("steps") ?? m.default_steps,
    guidance: number("guidance"),
    sampler: $("sampler").value,
    seed: number("seed"),
    n: number("n") ?? 1,
    size: $("size").value || null,
    strength: image ? number("strength") : null,
    image: image ? await readDataUrl(image) : null,
    mask: mask ? await readDataUrl(mask) : null,
  };
}

// Server-sent events from a fetch() body: yields [event, data] with data parsed as JSON.
async function* readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  const blank = /\r?\n\r?\n/;
  for (;;) {
    const { value, done } = await reader.read();
    buffer += done ? decoder.decode() + "\n\n" : decoder.decode(value, { stream: true });
    let match;
    while ((match = blank.exec(buffer))) {
      const block = buffer.slice(0, match.index);
      buffer = buffer.slice(match.index + match[0].length);
      let event = "message";
      const data = [];
      for (const line of block.split(/\r?\n/)) {
        if (line.startsWith(":")) continue; // comment / keep-alive
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) yield [event, JSON.parse(data.join("\n"))];
    }
    if (done) return;
  }
}

function setRunning(running) {
  $("generate").disabled = running || info === null;
  $("cancel").disabled = !running;
  document.body.classList.toggle("running", running);
}

function setProgress(key, args, step, total) {
  say($("progress"), key, ...args);
  if (total !== undefined) {
    $("bar").max = total;
    $("bar").value = step;
  }
}

// Seconds with one decimal, written the current language's way (1.5 / 1,5).
const secondsText = (seconds) =>
  seconds.toLocaleString(lang, { minimumFractionDigits: 1, maximumFractionDigits: 1 });

function paramsText(p, seconds) {
  const parts = [
    p.prompt ? `“${p.prompt}”` : t("noPrompt"),
    p.negative_prompt ? t("not", p.negative_prompt) : null,
    t("seedIs", p.seed),
    t("stepsAre", p.steps),
    p.guidance != null ? t("guidanceIs", p.guidance) : null,
    p.sampler,
    `${p.width}x${p.height}`,
    `${secondsText(seconds)} s`,
    info.models.length > 1 ? p.model : null,
  ];
  return parts.filter((s) => s !== null && s !== undefined).join(" · ");
}

function addResults(done) {
  const p = done.parameters;
  const batch = done.images.map((src, i) => {
    const result = document.createElement("figure");
    result.className = "result";
    const img = Object.assign(document.createElement("img"), { src, alt: p.prompt || t("image") });
    if (p.width < 256) img.className = "pixels"; // scaled up: keep the pixels crisp
    const caption = document.createElement("figcaption");
    caption.className = "params";
    const which = done.images.length > 1 ? ` · #${i + 1}` : "";
    const redraw = () => (caption.textContent = paramsText(p, done.seconds) + which);
    captions.push(redraw);
    redraw();
    const link = Object.assign(document.createElement("a"), { href: src });
    link.className = "download";
    link.download = `difusion-${p.seed}-${i}.png`;
    link.dataset.text = "download";
    const reuse = Object.assign(document.createElement("button"), { type: "button" });
    Object.assign(reuse.dataset, { text: "reuse", title: "reuseHint" });
    reuse.textContent = t("reuse");
    reuse.title = t("reuseHint");
    link.textContent = t("download");
    reuse.addEventListener("click", () => reuseParams(p));
    const actions = document.createElement("div");
    actions.className = "row";
    actions.append(link, reuse);
    result.append(img, caption, actions);
    return result;
  });
  $("gallery").prepend(...batch);
}

function reuseParams(p) {
  if (info.models.some((m) => m.name === p.model) && $("model").value !== p.model) {
    $("model").value = p.model;
    applyModel();
  }
  if (!$("prompt").disabled) $("prompt").value = p.prompt;
  if (!$("negative").disabled) $("negative").value = p.negative_prompt || "";
  $("steps").value = p.steps;
  if (p.guidance != null && !$("guidance").disabled) $("guidance").value = p.guidance;
  $("sampler").value = p.sampler;
  $("seed").value = p.seed;
  window.scrollTo({ top: 0, behavior: "smooth" });
}

function handle(event, data) {
  if (event === "queued") {
    if (data.position > 0) setProgress("queued", [data.position], 0, 1);
    else setProgress("queuedNext", [], 0, 1);
  } else if (event === "start") {
    setProgress("starting", [data.steps, data.seed], 0, data.steps);
  } else if (event === "progress") {
    $("preview").src = data.preview;
    $("preview").hidden = false;
    // on a phone the preview sits below the form: bring it into view as the run starts
    // (once the first preview has a size, or there is nothing below to scroll to)
    if (data.step === 1 && $("output").getBoundingClientRect().top > window.innerHeight / 2) {
      $("preview")
        .decode()
        .then(() => $("output").scrollIntoView({ block: "start", behavior: "smooth" }))
        .catch(() => {});
    }
    setProgress("step", [data.step, data.total], data.step, data.total);
  } else if (event === "done") {
    addResults(data);
    setProgress("doneIn", [secondsText(data.seconds)], $("bar").max, $("bar").max);
    return true;
  } else if (event === "error") {
    if (data.detail) showError(data.detail);
    else sayError("jobFailed");
    setProgress("failed", []);
    return true;
  }
  return false;
}

async function generate(event) {
  event.preventDefault();
  if (controller || !info) return;
  controller = new AbortController();
  setRunning(true);
  setProgress("sending", [], 0, 1);
  let finished = false;
  try {
    const response = await fetch("/api/generate", {
      method: "POST",
      headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }),
      body: JSON.stringify(await requestBody()),
      signal: controller.signal,
    });
    if (!(await accepted(response))) {
      setProgress("refused", []);
      return;
    }
    hideError();
    for await (const [name, data] of readEvents(response)) {
      if (handle(name, data)) finished = true;
    }
    if (!finished) sayError("closedEarly");
  } catch (err) {
    if (err.name === "AbortError") setProgress("cancelled", []);
    else showError(err.message || String(err));
  } finally {
    controller = null;
    setRunning(false);
  }
}

function cancel() {
  if (controller) controller.abort();
}

// --- wiring -----------------------------------------------------------------------------

// The largest whole-number scale that keeps the preview within 256 px high.
function sizePreview() {
  const img = $("preview");
  const scale = Math.max(1, Math.floor(256 / img.naturalHeight));
  img.style.width = $("bar").style.width = `${img.naturalWidth * scale}px`;
}

function init() {
  setLanguage(localStorage.getItem(LANG) || browserLanguage());
  say($("progress"), "imagesAppearHere");
  for (const button of document.querySelectorAll("#lang button")) {
    button.addEventListener("click", () => chooseLanguage(button.dataset.lang));
  }
  takeKeyFromUrl();
  $("preview").addEventListener("load", sizePreview);
  $("form").addEventListener("submit", generate);
  $("cancel").addEventListener("click", cancel);
  $("dice").addEventListener("click", () => {
    $("seed").value = Math.floor(Math.random() * 2 ** 31);
  });
  $("model").addEventListener("change", applyModel);
  $("classes").addEventListener("change", () => {
    if ($("classes").value) $("prompt").value = $("classes").value;
  });
  $("image").addEventListener("change", uploadChanged);
  $("mask").addEventListener("change", uploadChanged);
  $("clear-upload").addEventListener("click", clearUpload);
  $("key-save").addEventListener("click", saveKey);
  $("key").addEventListener("keydown", (e) => {
    if (e.key === "Enter") saveKey();
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("form").requestSubmit();
  });
  loadInfo();
}

init();
