/* urbansound: progressive enhancements only. Every page works without this file; it adds
   microphone recording (encoded to WAV here, then sent through the normal form), folder upload
   with relative paths (so folder names become labels), live job progress with training curves
   (an SVG drawn here: no chart library, nothing inline, so the strict CSP holds), "Wrong? It
   was ..." corrections without leaving the prediction, the footer's served model kept
   current (polls /api/v1/health while the page is visible), and on the Analyse page a click
   on an event plays just that stretch. */
"use strict";

(function () {
  // ------------------------------------------------------------------ microphone → WAV
  function encodeWav(samples, rate) {
    const buffer = new ArrayBuffer(44 + samples.length * 2);
    const view = new DataView(buffer);
    const text = (offset, s) => { for (let i = 0; i < s.length; i++) view.setUint8(offset + i, s.charCodeAt(i)); };
    text(0, "RIFF"); view.setUint32(4, 36 + samples.length * 2, true); text(8, "WAVE");
    text(12, "fmt "); view.setUint32(16, 16, true); view.setUint16(20, 1, true);
    view.setUint16(22, 1, true); view.setUint32(24, rate, true); view.setUint32(28, rate * 2, true);
    view.setUint16(32, 2, true); view.setUint16(34, 16, true);
    text(36, "data"); view.setUint32(40, samples.length * 2, true);
    for (let i = 0; i < samples.length; i++) {
      const s = Math.max(-1, Math.min(1, samples[i]));
      view.setInt16(44 + i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
    }
    return new Blob([view], { type: "audio/wav" });
  }

  function setupRecorder() {
    const box = document.querySelector("[data-recorder]");
    const form = document.getElementById("predict-form");
    if (!box || !form || !navigator.mediaDevices || !window.AudioContext || !window.DataTransfer) return;
    const button = box.querySelector("[data-record]");
    const status = box.querySelector("[data-record-status]");
    const input = form.querySelector('input[type="file"]');
    let session = null;
    box.hidden = false;

    async function start() {
      const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
      const ctx = new AudioContext();
      const source = ctx.createMediaStreamSource(stream);
      const node = ctx.createScriptProcessor(4096, 1, 1);
      const chunks = [];
      node.onaudioprocess = (e) => chunks.push(new Float32Array(e.inputBuffer.getChannelData(0)));
      source.connect(node); node.connect(ctx.destination);
      session = { stream, ctx, source, node, chunks, timer: setTimeout(stop, 4000) };
      button.setAttribute("aria-pressed", "true");
      button.textContent = "Stop recording";
      status.textContent = "Recording…";
    }

    async function stop() {
      if (!session) return;
      const { stream, ctx, source, node, chunks, timer } = session;
      session = null;
      clearTimeout(timer);
      node.disconnect(); source.disconnect();
      stream.getTracks().forEach((t) => t.stop());
      const rate = ctx.sampleRate;
      await ctx.close();
      const length = chunks.reduce((n, c) => n + c.length, 0);
      const samples = new Float32Array(length);
      let offset = 0;
      for (const c of chunks) { samples.set(c, offset); offset += c.length; }
      const transfer = new DataTransfer();
      transfer.items.add(new File([encodeWav(samples, rate)], "recording.wav", { type: "audio/wav" }));
      input.files = transfer.files;
      button.setAttribute("aria-pressed", "false");
      button.textContent = "Record 4 s from microphone";
      status.textContent = `Recorded ${(length / rate).toFixed(1)} s; classifying…`;
      form.requestSubmit ? form.requestSubmit() : form.submit();
    }

    button.addEventListener("click", () => {
      (session ? stop() : start()).catch((err) => {
        session = null;
        button.setAttribute("aria-pressed", "false");
        status.textContent = `Microphone unavailable: ${err.message || err}`;
      });
    });
  }

  // ------------------------------------------------------------------ folder upload
  function setupUpload() {
    const form = document.querySelector("form[data-upload]");
    if (!form || !window.fetch || !window.FormData) return;
    const status = form.querySelector("[data-upload-status]");
    const report = document.getElementById("upload-report");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const body = new FormData();
      for (const [key, value] of new FormData(form)) if (key !== "files") body.append(key, value);
      let n = 0;
      for (const input of form.querySelectorAll('input[type="file"]')) {
        for (const file of input.files) { body.append("files", file, file.webkitRelativePath || file.name); n++; }
      }
      if (!n) { status.textContent = "Choose a folder or some files first."; return; }
      status.textContent = `Uploading ${n} file${n === 1 ? "" : "s"}…`;
      const button = form.querySelector('button[type="submit"]');
      button.disabled = true;
      try {
        const response = await fetch(form.action, {
          method: "POST", body, credentials: "same-origin", headers: { "X-Requested-With": "fetch" },
        });
        if (response.headers.get("X-Partial") === "1") {
          report.innerHTML = await response.text();
          const box = report.querySelector("template[data-uploads-box]");
          const target = document.getElementById("uploads-box");
          if (box && target) { target.replaceChildren(box.content.cloneNode(true)); box.remove(); }
          const summary = report.querySelector("[data-n-files]");
          if (response.ok && summary) {
            const total = Number(summary.dataset.nFiles);
            status.textContent = `${summary.dataset.nAccepted} of ${total} file${total === 1 ? "" : "s"} accepted.`;
          } else {
            status.textContent = "The upload was refused.";
          }
        } else if (response.redirected) {
          window.location.assign(response.url);
        } else {
          status.textContent = `Upload failed (HTTP ${response.status}${response.status === 413 ? ": too large" : ""}).`;
        }
      } catch (err) {
        status.textContent = `Upload failed: ${err.message || err}`;
      } finally {
        button.disabled = false;
      }
    });
  }

  // ------------------------------------------------------------------ job progress
  function fmt(value) { return typeof value === "number" ? value.toFixed(4) : "–"; }

  function duration(seconds) {  // the same words as the server's "duration" filter
    seconds = Math.max(0, seconds);
    return seconds < 90 ? `${Math.round(seconds)} s` : `${Math.ceil(seconds / 60)} min`;
  }

  const SVG = "http://www.w3.org/2000/svg";
  function svgEl(name, attrs, text) {
    const el = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attrs || {})) el.setAttribute(key, String(value));
    if (text !== undefined) el.textContent = text;
    return el;
  }

  /* Loss (left scale) and validation macro-F1 (right scale, 0-1) per epoch; the x axis spans
     the planned epochs, so the curves grow towards the right as the job runs. */
  function drawCurves(figure, history, epochs) {
    const points = (history || []).filter((h) => typeof h.epoch === "number");
    figure.hidden = points.length === 0;
    const old = figure.querySelector("svg");
    if (old) old.remove();
    if (!points.length) return;
    const W = 640, H = 240, L = 52, R = 44, T = 14, B = 34;
    const last = points[points.length - 1].epoch;
    const span = Math.max(epochs || 0, last, 2);
    const losses = points.map((h) => h.loss).filter((v) => typeof v === "number");
    const top = Math.max(...losses, 1e-6) * 1.1;
    const x = (e) => L + ((e - 1) / (span - 1)) * (W - L - R);
    const yLoss = (v) => T + (1 - v / top) * (H - T - B);
    const yF1 = (v) => T + (1 - v) * (H - T - B);
    const svg = svgEl("svg", {
      viewBox: `0 0 ${W} ${H}`, class: "curves-svg", role: "img", "data-testid": "curves-svg",
      "aria-label": `Training curves over ${points.length} epoch${points.length === 1 ? "" : "s"}: ` +
        `loss ${fmt(losses[losses.length - 1])}, validation macro-F1 ${fmt(points[points.length - 1].val_f1)} at epoch ${last}`,
    });
    for (const f of [0, 0.5, 1]) {  // grid + both scales
      const y = T + (1 - f) * (H - T - B);
      svg.append(svgEl("line", { x1: L, x2: W - R, y1: y, y2: y, class: "grid" }));
      svg.append(svgEl("text", { x: L - 6, y: y + 4, class: "tick tick-loss", "text-anchor": "end" },
        (top * f).toPrecision(2)));
      svg.append(svgEl("text", { x: W - R + 6, y: y + 4, class: "tick tick-f1" }, f.toFixed(1)));
    }
    const ticks = [...new Set([1, Math.round((1 + span) / 2), span])];
    for (const e of ticks) {
      svg.append(svgEl("text", { x: x(e), y: H - B + 16, class: "tick", "text-anchor": "middle" }, e));
    }
    svg.append(svgEl("text", { x: (L + W - R) / 2, y: H - 4, class: "tick", "text-anchor": "middle" }, "epoch"));
    svg.append(svgEl("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, class: "axis" }));
    const series = [
      ["loss", yLoss, (h) => h.loss],
      ["f1", yF1, (h) => h.val_f1],
    ];
    for (const [name, y, value] of series) {
      const pts = points.filter((h) => typeof value(h) === "number");
      if (!pts.length) continue;
      svg.append(svgEl("polyline", {
        class: `line line-${name}`, "data-series": name,
        points: pts.map((h) => `${x(h.epoch).toFixed(1)},${y(value(h)).toFixed(1)}`).join(" "),
      }));
      for (const h of pts) {
        const dot = svgEl("circle", { cx: x(h.epoch).toFixed(1), cy: y(value(h)).toFixed(1), r: 3.5,
                                      class: `pt pt-${name}` });
        dot.append(svgEl("title", {}, `epoch ${h.epoch}: ${name === "f1" ? "val macro-F1" : "loss"} ${fmt(value(h))}`));
        svg.append(dot);
      }
    }
    figure.prepend(svg);
  }

  function historyRows(tbody, history) {
    tbody.replaceChildren(...(history || []).map((h) => {
      const row = document.createElement("tr");
      for (const text of [h.epoch, fmt(h.loss), fmt(h.val_f1),
        typeof h.seconds === "number" ? h.seconds.toFixed(1) : "–"]) {
        const cell = document.createElement("td");
        cell.className = "num";
        cell.textContent = text;
        row.append(cell);
      }
      return row;
    }));
  }

  function renderJob(box, job) {
    const field = (name) => box.querySelector(`[data-field="${name}"]`) || document.querySelector(`[data-field="${name}"]`);
    const p = job.progress || {};
    const history = p.history || [];
    box.className = `job job-${job.status}`;
    const banners = JSON.parse(box.dataset.banners || "{}");
    const [tone, title] = banners[job.status] || ["info", job.status];
    const banner = field("banner");
    banner.className = `alert alert-${tone}`;
    // a failed job: the reason itself (its message repeats it after "Failed:")
    const text = (job.status === "failed" && job.error) || job.message || job.error || "";
    field("banner-title").textContent = title + (text ? ":" : "");
    field("message").textContent = text;
    const status = field("status");
    status.textContent = job.status;
    status.className = `status status-${job.status}`;
    field("stage").textContent = p.stage || "";
    field("epoch").textContent = p.epoch || 0;
    field("epochs").textContent = p.epochs || "?";
    field("eta").textContent = !job.done && typeof p.eta_s === "number" ? `· about ${duration(p.eta_s)} left` : "";
    const bar = field("bar");
    bar.max = p.epochs || 1;
    // A failed job's bar is empty (and red): it did not get anywhere worth showing.
    bar.value = job.status === "failed" ? 0 : job.done ? bar.max : (p.epoch || 0);
    bar.className = `bar bar-${job.status}`;
    const stopped = field("stopped");
    if (p.stopped_early) {
      const at = history.length ? history[history.length - 1].epoch : p.epoch;
      stopped.textContent = `Early stopping ended training after epoch ${at} of ${p.epochs}` +
        (p.stop_reason ? ` (${p.stop_reason}).` : ".");
    }
    stopped.hidden = !p.stopped_early;
    // The last epoch's numbers stay on screen once later stages replace them.
    if (typeof p.loss === "number") field("loss").textContent = fmt(p.loss);
    if (typeof p.val_f1 === "number") field("val_f1").textContent = fmt(p.val_f1);
    drawCurves(field("curves"), history, p.epochs);
    historyRows(field("history-rows"), history);
    field("history").hidden = history.length === 0;
    const m = job.metrics || {};
    if (m.candidate) {
      field("candidate_f1").textContent = fmt(m.candidate.macro_f1);
      field("served_f1").textContent = fmt((m.served || {}).macro_f1);
      field("result").hidden = false;
    }
    if (job.result_version && field("result-link")) {
      const link = field("result-version");
      link.textContent = job.result_version;
      link.href = `/training/models/${encodeURIComponent(job.result_version)}`;
      field("result-link").hidden = false;
    }
  }

  function setupJob() {
    const box = document.querySelector("[data-job-url]");
    if (!box) return;
    const curves = box.querySelector('[data-field="curves"]');
    try {  // the page's own numbers first (a finished job is drawn without polling)
      drawCurves(curves, JSON.parse(curves.dataset.history || "[]"),
                 Number(box.querySelector('[data-field="epochs"]').textContent) || 0);
    } catch (err) { /* the table below the chart still has the numbers */ }
    if (box.dataset.done === "true" || !window.fetch) return;
    async function poll() {
      let job;
      try {
        const response = await fetch(box.dataset.jobUrl, { headers: { Accept: "application/json" } });
        if (!response.ok) throw new Error(`HTTP ${response.status}`);
        job = await response.json();
      } catch (err) {
        setTimeout(poll, 3000);
        return;
      }
      renderJob(box, job);
      if (job.done) {
        box.dataset.done = "true";
        if (job.status === "succeeded") checkServedModel();  // the footer follows the promotion
        return;
      }
      setTimeout(poll, 1000);
    }
    poll();
  }

  // ------------------------------------------------------------------ served model (footer)
  let checkServedModel = () => {};
  function setupServedModel() {
    const el = document.querySelector("[data-health-url]");
    if (!el || !window.fetch) return;
    let busy = false;
    checkServedModel = async () => {
      if (busy || document.hidden) return;
      busy = true;
      try {
        const response = await fetch(el.dataset.healthUrl, { headers: { Accept: "application/json" } });
        if (response.ok) {
          const health = await response.json();
          const version = health.model_version || "none yet";
          if (el.textContent !== version) {
            el.textContent = version;
            el.classList.add("changed");
          }
        }
      } catch (err) { /* offline for a moment: try on the next tick */ }
      busy = false;
    };
    setInterval(checkServedModel, 5000);
    document.addEventListener("visibilitychange", () => { if (!document.hidden) checkServedModel(); });
  }

  // ------------------------------------------------------------------ "Wrong? It was ..."
  function setupFeedback() {
    const form = document.querySelector("form[data-feedback]");
    const out = document.querySelector("[data-feedback-report]");
    if (!form || !out || !window.fetch) return;
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const button = form.querySelector('button[type="submit"]');
      button.disabled = true;
      try {
        const response = await fetch(form.action, {
          method: "POST", body: new FormData(form), credentials: "same-origin",
          headers: { "X-Requested-With": "fetch" },
        });
        if (response.headers.get("X-Partial") === "1") {
          out.innerHTML = await response.text();
          if (response.ok) { form.hidden = true; return; }  // one correction per prediction
        } else if (response.redirected) {
          window.location.assign(response.url);  // the session expired: the login page
          return;
        } else {
          out.textContent = `Could not save the correction (HTTP ${response.status}).`;
        }
      } catch (err) {
        out.textContent = `Could not save the correction: ${err.message || err}`;
      }
      button.disabled = false;
    });
  }

  // ------------------------------------------------------------------ data set visuals
  function setupVisuals() {
    const note = document.querySelector("[data-visuals-status]");
    if (!note || !window.fetch) return;
    async function poll() {
      try {
        const response = await fetch(note.dataset.visualsStatus, { headers: { Accept: "application/json" } });
        const state = await response.json();
        if (state.ready || state.error) { window.location.reload(); return; }
      } catch (err) { /* try again */ }
      setTimeout(poll, 3000);
    }
    setTimeout(poll, 2000);
  }

  // ------------------------------------------------------------------ analysis: play an event
  // Without this, an event's link opens the recording at a media fragment (#t=start,end);
  // with it, the page's own player seeks there and stops at the event's end.
  function setupEventPlayer() {
    const player = document.querySelector("[data-analysis-player]");
    if (!player) return;
    let stopAt = null;
    player.addEventListener("timeupdate", () => {
      if (stopAt !== null && player.currentTime >= stopAt) { player.pause(); stopAt = null; }
    });
    document.querySelectorAll("[data-play-start]").forEach((link) => {
      link.addEventListener("click", (event) => {
        event.preventDefault();
        const start = parseFloat(link.dataset.playStart);
        stopAt = parseFloat(link.dataset.playEnd);
        player.currentTime = start;
        player.play().catch(() => { stopAt = null; });
      });
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    setupEventPlayer();
    setupRecorder();
    setupUpload();
    setupJob();
    setupVisuals();
    setupServedModel();
    setupFeedback();
  });
})();
