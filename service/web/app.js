// rtprune-ocr try-out page: upload, run /v1/ocr with token_map=true, show what the pruner kept.
"use strict";

const $ = (id) => document.getElementById(id);
const STAGES = ["queue", "preprocess", "vision", "prune", "assemble", "prefill", "decode"];
const COLORS = { k: "rgba(22,163,74,0.35)", m: "rgba(234,88,12,0.45)", d: "rgba(220,38,38,0.45)" };
let response = null;
let current = 0;

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));
}

// Model output is untrusted: HTML tables are rebuilt from their text only, everything else is escaped.
function safeTable(html) {
  const doc = new DOMParser().parseFromString(html, "text/html");
  const table = document.createElement("table");
  for (const tr of doc.querySelectorAll("tr")) {
    const row = table.insertRow();
    for (const cell of tr.querySelectorAll("td,th")) {
      const out = row.insertCell();
      out.textContent = cell.textContent;
      if (cell.colSpan > 1) out.colSpan = cell.colSpan;
      if (cell.rowSpan > 1) out.rowSpan = cell.rowSpan;
    }
  }
  return table.outerHTML;
}

function renderMarkdown(markdown) {
  const blocks = markdown.split(/\n{2,}/);
  return blocks.map((block) => {
    const text = block.trim();
    if (!text) return "";
    if (/^<table/i.test(text)) return safeTable(text);
    const heading = text.match(/^(#{1,6})\s+(.*)$/);
    if (heading && !text.includes("\n")) return `<h${heading[1].length}>${escapeHtml(heading[2])}</h${heading[1].length}>`;
    const lines = text.split("\n");
    if (lines.length > 1 && lines.every((l) => l.trim().startsWith("|"))) {
      const rows = lines.filter((l) => !/^\|\s*-/.test(l.trim()));
      const cells = (l) => l.trim().replace(/^\||\|$/g, "").split("|").map((c) => `<td>${escapeHtml(c.trim())}</td>`).join("");
      return `<table>${rows.map((l) => `<tr>${cells(l)}</tr>`).join("")}</table>`;
    }
    return `<p>${lines.map(escapeHtml).join("<br>")}</p>`;
  }).join("\n");
}

function setStatus(text) { $("status").textContent = text; }

function drawOverlay() {
  const page = response && response.pages[current];
  const image = $("page-image");
  const canvas = $("overlay");
  const ctx = canvas.getContext("2d");
  canvas.width = image.naturalWidth;
  canvas.height = image.naturalHeight;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!page || !page.token_map) return;
  const map = page.token_map;
  const scale = canvas.width / map.page_size[0];  // page pixels -> preview pixels
  if ($("show-tokens").checked) {
    const [rows, cols] = map.grid;
    const [x0, y0, x1, y1] = map.content_box;
    const cell = map.view_size / cols;
    const sx = (map.page_size[0] / (x1 - x0)) * scale;
    const sy = (map.page_size[1] / (y1 - y0)) * scale;
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) {
        const vx = Math.max(c * cell, x0), vy = Math.max(r * cell, y0);
        const vx2 = Math.min((c + 1) * cell, x1), vy2 = Math.min((r + 1) * cell, y1);
        if (vx2 <= vx || vy2 <= vy) continue;  // a token over the grey padding only
        ctx.fillStyle = COLORS[map.status[r * cols + c]];
        ctx.fillRect((vx - x0) * sx, (vy - y0) * sy, (vx2 - vx) * sx, (vy2 - vy) * sy);
      }
    }
  }
  if ($("show-boxes").checked) {
    ctx.strokeStyle = "#1d4ed8";
    ctx.lineWidth = Math.max(1, canvas.width / 400);
    ctx.font = `${Math.max(10, canvas.width / 60)}px sans-serif`;
    ctx.fillStyle = "#1d4ed8";
    for (const { label, box } of page.boxes) {
      const [a, b, c, d] = box.map((v) => v * scale);
      ctx.strokeRect(a, b, c - a, d - b);
      ctx.fillText(label, a + 2, b + 12);
    }
  }
}

function showPage(index) {
  current = index;
  const page = response.pages[index];
  for (const [i, tab] of [...$("page-tabs").children].entries()) tab.setAttribute("aria-selected", String(i === index));
  $("page-image").src = page.preview || "";
  $("markdown").innerHTML = renderMarkdown(page.markdown) || "<p class=\"muted\">(no text)</p>";
  const s = page.stats, req = s.retention_requested;
  const rows = [
    ["grid tokens (what retention prunes)", `${s.grid_tokens_kept} of ${s.grid_tokens} kept: ${(100 * s.retention).toFixed(1)}% (asked: ${req.value})`],
    ["visual tokens (grid + newlines + separator)", `${s.visual_tokens_kept} of ${s.visual_tokens} reach the model (${(100 * s.visual_share).toFixed(1)}%)`],
  ];
  if (req.dynamic != null) rows.push(["dynamic ratio", `${req.dynamic.toFixed(4)} (r_sim ${req.r_sim.toFixed(4)}, r_txt ${req.r_txt.toFixed(4)})`]);
  rows.push(["prompt tokens", String(s.prompt_tokens)], ["output tokens", `${s.output_tokens} (${s.finish_reason})`],
            ["decode speed", `${s.decode_tokens_per_s.toFixed(1)} tokens/s`], ["this page's time (its stages, below)", `${s.latency_ms.total.toFixed(0)} ms`]);
  $("token-stats").innerHTML = rows.map(([k, v]) => `<dt>${escapeHtml(k)}</dt><dd>${escapeHtml(v)}</dd>`).join("");
  const longest = Math.max(1, ...STAGES.map((k) => s.latency_ms[k]));
  $("latency-chart").setAttribute("aria-label", STAGES.map((k) => `${k} ${s.latency_ms[k].toFixed(0)} ms`).join(", "));
  $("latency-chart").innerHTML = STAGES.map((k) => `<div class="bar"><span class="name">${k}</span>` +
    `<span class="fill" style="width:${(70 * s.latency_ms[k] / longest).toFixed(1)}%"></span>` +
    `<span>${s.latency_ms[k].toFixed(0)}</span></div>`).join("");
  if ($("page-image").complete) drawOverlay();
}

async function run(event) {
  event.preventDefault();
  const file = $("file").files[0];
  if (!file) { setStatus("Choose a file first."); return; }
  const form = new FormData();
  form.append("file", file);
  for (const id of ["mode", "task", "pruner"]) form.append(id, $(id).value);
  if ($("task").value === "locate") form.append("ref", $("ref").value);
  form.append("retention", $("auto").checked ? "auto" : $("retention").value);
  form.append("max_new_tokens", $("max-new-tokens").value);
  form.append("token_map", "true");
  const headers = $("api-key").value ? { "X-API-Key": $("api-key").value } : {};
  $("run").disabled = true;
  setStatus("Running…");
  try {
    const reply = $("as-job").checked ? await runJob(form, headers)
                                      : await fetch("/v1/ocr", { method: "POST", body: form, headers });
    if (!reply) return;
    const body = await reply.json();
    if (!reply.ok) { setStatus(`Error ${reply.status}: ${body.error ? body.error.message : reply.statusText}`); return; }
    response = body;
    $("warnings").innerHTML = body.warnings.map((w) => `<p>${escapeHtml(w)}</p>`).join("");
    $("page-tabs").innerHTML = body.pages.map((p, i) => `<button type="button" role="tab" data-i="${i}">Page ${p.page}</button>`).join("");
    $("page-tabs").hidden = body.pages.length < 2;
    $("results").hidden = false;
    showPage(0);
    const pages = body.pages.length === 1 ? "the page" : `all ${body.pages.length} pages`;
    setStatus(`Done: the request took ${body.stats.latency_ms.total.toFixed(0)} ms, upload to answer; ${body.stats.visual_tokens_kept} of ${body.stats.visual_tokens} visual tokens (grid + newlines + separators) of ${pages} reached the model.`);
  } catch (error) {
    setStatus(`Request failed: ${error}`);
  } finally {
    $("run").disabled = false;
  }
}

// A job answers 202 at once; poll its progress (EventSource cannot send the API key), then fetch the result.
async function runJob(form, headers) {
  const started = await fetch("/v1/jobs", { method: "POST", body: form, headers });
  if (!started.ok) return started;
  const job = await started.json();
  const bar = $("job-progress");
  bar.max = job.pages_total; bar.value = 0; bar.hidden = false;
  for (;;) {
    const status = await (await fetch(`/v1/jobs/${job.id}`, { headers })).json();
    bar.value = status.pages_done;
    setStatus(`Job ${status.state}: ${status.pages_done} of ${status.pages_total} pages done…`);
    if (status.state === "done") return fetch(`/v1/jobs/${job.id}/result`, { headers });
    if (status.state === "failed" || status.state === "cancelled") {
      setStatus(`Job ${status.state}${status.error ? `: ${status.error}` : ""}`);
      return null;
    }
    await new Promise((resolve) => setTimeout(resolve, 300));
  }
}

$("ocr-form").addEventListener("submit", run);
$("auto").addEventListener("change", () => { $("retention").disabled = $("auto").checked; });
$("retention").addEventListener("input", () => { $("retention-value").value = $("retention").value; });
$("task").addEventListener("change", () => { $("ref-row").hidden = $("task").value !== "locate"; });
$("page-image").addEventListener("load", drawOverlay);
$("show-tokens").addEventListener("change", drawOverlay);
$("show-boxes").addEventListener("change", drawOverlay);
$("page-tabs").addEventListener("click", (e) => { if (e.target.dataset.i) showPage(Number(e.target.dataset.i)); });
fetch("/v1/info").then((r) => r.ok ? r.json() : null).then((info) => {
  if (!info) return;
  $("model-line").textContent = `Model ${info.model}${info.random_weights ? " (random weights: text is meaningless)" : ""} on ${info.device}`;
  for (const option of $("mode").options) option.disabled = info.modes.length > 0 && !info.modes.includes(option.value);
  // the server's default budget (small on a random preset, which never writes end-of-text) and its cap
  $("max-new-tokens").value = info.defaults.max_new_tokens;
  $("max-new-tokens").max = info.limits.max_new_tokens;
}).catch(() => {});
