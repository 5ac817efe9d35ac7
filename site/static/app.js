// Upload page logic: preview, POST the file to the inference API, draw every class as a bar.
// Settings (API base, model, classes) come from the JSON the build script rendered from meta.json.
"use strict";
(function () {
  const config = JSON.parse(document.getElementById("config").textContent);
  const $ = (id) => document.getElementById(id);
  const input = $("file"), drop = $("dropzone"), statusBox = $("status"), spinner = $("spinner");
  const bars = $("bars"), concern = $("concern"), answeredBy = $("answered-by");
  const endpoint = `${config.apiBase}/predictions/${encodeURIComponent(config.model)}`;
  const TIMEOUT_MS = 30000;
  let previewUrl = null;
  let currentFile = null;
  // Each new image supersedes whatever was asked about the previous one: its requests are aborted and a late
  // answer is dropped, so a heat map or result can never appear under another image's verdict.
  let generation = 0;
  let inFlight = new AbortController();
  const explainButton = $("explain");

  function setStatus(text, kind) {
    if (["ok", "uncertain", "refused"].includes(kind)) {  // an answer: what the heat map returns to afterwards
      statusBox.dataset.last = text;
      statusBox.dataset.lastKind = kind;
    }
    statusBox.textContent = text;
    statusBox.className = kind || "";
  }

  function clearResult() {
    bars.replaceChildren();
    explainButton.hidden = true;
    $("explanation-box").hidden = true;
    concern.hidden = true;
    answeredBy.textContent = "";
  }

  const sentence = (text) => text.charAt(0).toUpperCase() + text.slice(1);

  function showPrediction(body) {
    clearResult();
    answeredBy.textContent = `Answered by ${body.model.name} version ${body.model.version}. ${body.notice}`;
    if (body.verdict === "not_dermoscopy") {
      // A refusal: no bars, no heat map to offer, the same notice as every other answer.
      setStatus(`Not analysed: ${body.verdict_reason}. If this is a skin lesion, have it examined by a ` +
        "clinician: the model also turns away some unusual real lesions.", "refused");
      return;
    }
    body.predictions.forEach((p, rank) => {
      const li = document.createElement("li");
      li.className = "bar" + (rank < 3 ? " top" : "");
      li.dataset.code = p.code;
      const pct = (100 * p.probability).toFixed(1);
      li.innerHTML = `<span class="label"><code></code> <span class="name"></span></span>
        <span class="track"><span class="fill"></span></span>
        <span class="value">${pct}%</span>`;
      li.querySelector(".fill").style.width = `${pct}%`;  // CSSOM, allowed by the page's CSP
      li.querySelector("code").textContent = p.code;
      li.querySelector(".name").textContent = p.name;
      li.setAttribute("aria-label", `${p.name}: ${pct} percent`);
      bars.appendChild(li);
    });
    // The service decides (skinmodel/answers.py: a threshold chosen on validation); the page only words it.
    if (body.concern && body.concern.flagged) {
      $("concern-share").textContent = `${(100 * body.concern.probability).toFixed(1)}%`;
      concern.hidden = false;
    }
    explainButton.hidden = false;
    const unsure = body.verdict === "uncertain" ? ` ${sentence(body.verdict_reason)}.` : "";
    setStatus(`Most similar to: ${body.top.name} (${(100 * body.top.probability).toFixed(1)}%).${unsure}`,
      body.verdict === "uncertain" ? "uncertain" : "ok");
  }

  async function classify(file) {
    const mine = generation, controller = inFlight;
    clearResult();
    spinner.hidden = false;
    setStatus("Analysing…", "busy");
    const timer = setTimeout(() => controller.abort(), TIMEOUT_MS);
    try {
      // Retry policy (also ops'): 503 (queue full) and 507 (worker died) are retried twice, after the
      // server's Retry-After or 1 s then 2 s; any other answer is final.
      let response;
      for (let attempt = 0; ; attempt++) {
        response = await fetch(endpoint, {
          method: "POST", body: file, signal: controller.signal,
          headers: { "Content-Type": "application/octet-stream" },
        });
        if (![503, 507].includes(response.status) || attempt >= 2) break;
        const wait = 1000 * (Number(response.headers.get("Retry-After")) || attempt + 1);
        setStatus("The service is busy; retrying…", "busy");
        await new Promise((resolve) => setTimeout(resolve, wait));
        if (mine !== generation) return;
      }
      let body = null;
      try { body = await response.json(); } catch (_) { /* not JSON: handled below */ }
      if (mine !== generation) return;  // another image was chosen meanwhile
      if (response.ok && body && body.predictions) {
        showPrediction(body);
      } else if (body && body.reason) {
        setStatus(`The image was rejected: ${body.reason}`, "error");
      } else if (response.status === 413) {
        setStatus("The file is too large (the limit is 10 MB).", "error");
      } else if (response.status === 502 || response.status === 503 || response.status === 504) {
        setStatus("The prediction service is busy or not reachable right now. Please try again in a minute.", "error");
      } else {
        setStatus(`The prediction service answered with an error (HTTP ${response.status}).`, "error");
      }
    } catch (err) {
      if (mine !== generation) return;
      setStatus(err.name === "AbortError"
        ? "The prediction service did not answer in time. Please try again."
        : "The prediction service is not reachable. Is the stack running?", "error");
    } finally {
      clearTimeout(timer);
      if (mine === generation) spinner.hidden = true;
    }
  }

  async function explain() {
    const mine = generation;
    explainButton.disabled = true;
    setStatus("Computing the heat map…", "busy");
    // Its own deadline; a new image (inFlight aborted) cancels it too.
    const controller = new AbortController(), superseded = inFlight.signal;
    const cancel = () => controller.abort();
    superseded.addEventListener("abort", cancel);
    const timer = setTimeout(cancel, TIMEOUT_MS);
    try {
      const response = await fetch(`${config.apiBase}/explanations/${encodeURIComponent(config.model)}`, {
        method: "POST", body: currentFile, signal: controller.signal,
        headers: { "Content-Type": "application/octet-stream" },
      });
      let body = {};
      try { body = await response.json(); } catch (_) { /* not JSON: reported by status below */ }
      if (mine !== generation) return;  // another image was chosen meanwhile
      if (response.ok && body.verdict === "not_dermoscopy") {  // the same refusal /predictions gives
        showPrediction(body);
        return;
      }
      if (!response.ok || !body.explanation) throw new Error(body.reason || `HTTP ${response.status}`);
      $("explanation").src = `data:image/png;base64,${body.explanation.image_png_base64}`;
      const name = (config.classes.find((c) => c.code === body.explanation.class) || {}).name;
      $("explanation-caption").textContent = `Regions that raised the score of ${name || body.explanation.class} ` +
        "(Grad-CAM; red = strongest). The dimmed border was not seen by the model.";
      $("explanation-box").hidden = false;  // scrolled into view once the picture has its height (below)
      setStatus(statusBox.dataset.last || "", statusBox.dataset.lastKind || "ok");
    } catch (err) {
      if (mine !== generation) return;
      const why = err.name === "AbortError" ? "the service did not answer in time; please try again"
        : err.name === "TypeError" ? "the service is not reachable" : err.message;
      setStatus(`No heat map: ${why}.`, "error");
    } finally {
      clearTimeout(timer);
      superseded.removeEventListener("abort", cancel);
      explainButton.disabled = false;
    }
  }
  explainButton.addEventListener("click", explain);
  $("explanation").addEventListener("load", () => {
    if (!$("explanation-box").hidden) $("explanation-box").scrollIntoView({ behavior: "smooth", block: "nearest" });
  });

  function take(file) {
    if (!file) return;
    currentFile = file;
    generation += 1;
    inFlight.abort();
    inFlight = new AbortController();
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    $("preview").src = previewUrl;
    $("file-name").textContent = file.name;
    $("preview-box").hidden = false;
    classify(file);
  }

  $("preview").addEventListener("error", () => { $("preview-box").hidden = true; });
  $("preview").addEventListener("load", () => { $("preview-box").hidden = false; });
  input.addEventListener("change", () => take(input.files[0]));
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") { e.preventDefault(); input.click(); }
  });
  ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault(); drop.classList.add("over");
  }));
  ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, (e) => {
    e.preventDefault(); drop.classList.remove("over");
  }));
  drop.addEventListener("drop", (e) => take(e.dataTransfer.files[0]));
})();
