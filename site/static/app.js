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
  const explainButton = $("explain");

  function setStatus(text, kind) {
    if (kind === "ok") statusBox.dataset.last = text;
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

  function showPrediction(body) {
    clearResult();
    if (body.verdict === "not_dermoscopy") {
      setStatus(`Not analysed: ${body.verdict_reason}. If this is a skin lesion, have it examined by a ` +
        "clinician: the model also turns away some unusual real lesions.", "error");
      answeredBy.textContent = `Answered by ${body.model.name} version ${body.model.version}.`;
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
    const worrying = body.predictions.slice(0, 2).some((p) => config.concerning.includes(p.code)) ||
      body.predictions.some((p) => config.concerning.includes(p.code) && p.probability >= 0.25);
    concern.hidden = !worrying;
    answeredBy.textContent = `Answered by ${body.model.name} version ${body.model.version}. ${body.notice}`;
    explainButton.hidden = false;
    const unsure = body.verdict === "uncertain" ? ` The model is unsure: ${body.verdict_reason}.` : "";
    setStatus(`Most similar to: ${body.top.name} (${(100 * body.top.probability).toFixed(1)}%).${unsure}`, "ok");
  }

  async function classify(file) {
    clearResult();
    spinner.hidden = false;
    setStatus("Analysing…", "busy");
    const controller = new AbortController();
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
      }
      let body = null;
      try { body = await response.json(); } catch (_) { /* not JSON: handled below */ }
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
      setStatus(err.name === "AbortError"
        ? "The prediction service did not answer in time. Please try again."
        : "The prediction service is not reachable. Is the stack running?", "error");
    } finally {
      clearTimeout(timer);
      spinner.hidden = true;
    }
  }

  async function explain() {
    explainButton.disabled = true;
    setStatus("Computing the heat map…", "busy");
    try {
      const response = await fetch(`${config.apiBase}/explanations/${encodeURIComponent(config.model)}`, {
        method: "POST", body: currentFile, headers: { "Content-Type": "application/octet-stream" },
      });
      const body = await response.json();
      if (!response.ok || !body.explanation) throw new Error(body.reason || `HTTP ${response.status}`);
      $("explanation").src = `data:image/png;base64,${body.explanation.image_png_base64}`;
      $("explanation-caption").textContent = `Regions that raised the score of ${body.explanation.class} ` +
        "(Grad-CAM; red = strongest). The dimmed border was not seen by the model.";
      $("explanation-box").hidden = false;
      setStatus(statusBox.dataset.last || "", "ok");
    } catch (err) {
      setStatus(`No heat map: ${err.message}`, "error");
    } finally {
      explainButton.disabled = false;
    }
  }
  explainButton.addEventListener("click", explain);

  function take(file) {
    if (!file) return;
    currentFile = file;
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
