/* urbansound: progressive enhancements only. Every page works without this file; it adds
   microphone recording (encoded to WAV here, then sent through the normal form), folder upload
   with relative paths (so folder names become labels) and live job progress. */
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
          status.textContent = response.ok ? "Done." : "The upload was refused.";
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

  function setupJob() {
    const box = document.querySelector("[data-job-url]");
    if (!box || box.dataset.done === "true" || !window.fetch) return;
    const field = (name) => box.querySelector(`[data-field="${name}"]`) || document.querySelector(`[data-field="${name}"]`);
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
      const p = job.progress || {};
      const status = field("status");
      status.textContent = job.status;
      status.className = `status status-${job.status}`;
      field("stage").textContent = p.stage || "";
      field("epoch").textContent = p.epoch || 0;
      field("epochs").textContent = p.epochs || "?";
      const bar = field("bar");
      bar.max = p.epochs || 1;
      bar.value = job.done ? bar.max : (p.epoch || 0);
      // The last epoch's numbers stay on screen once later stages replace them.
      if (typeof p.loss === "number") field("loss").textContent = fmt(p.loss);
      if (typeof p.val_f1 === "number") field("val_f1").textContent = fmt(p.val_f1);
      field("message").textContent = job.message || job.error || "";
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
      if (job.done) { box.dataset.done = "true"; return; }
      setTimeout(poll, 1000);
    }
    poll();
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

  document.addEventListener("DOMContentLoaded", () => {
    setupRecorder();
    setupUpload();
    setupJob();
    setupVisuals();
  });
})();
