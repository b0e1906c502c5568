// Drives the service's page (serve_app/api/page.html) in headless Chromium through playwright-core,
// as a user would: choose a file, fill the form, submit, wait for the result video or an error.
//
//   node page_check.js spec.json
//   spec: {chromium, userDataDir, url, file, form: {prompt, concepts, promptFrame, boxes, mode, threshold,
//          alpha, maxObjects, token}, timeoutMs, seekTo}
//   (concepts: more concepts, added with "+ concept"; boxes: [{box: [x, y, w, h] in the video's
//   pixels, label}], drawn with the mouse on the preview, shift held for a negative one)
//
// Prints one JSON line: {outcome: "result" | "error" | "timeout", error, progress: {value, max},
// seen: [{value, max, stage}] (every progress the page displayed), stage, video: {readyState,
// duration, videoWidth, videoHeight, src, seeked}, downloads, responses: [{method, path, status}],
// posted: [the job JSON the service answered each submission with], console: [page errors]}.
"use strict";
const fs = require("fs");
const { chromium } = require("playwright-core");

const spec = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
const ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
  "--disable-background-networking", "--disable-component-update", "--disable-sync"];

(async () => {
  const context = await chromium.launchPersistentContext(spec.userDataDir, {
    executablePath: spec.chromium, headless: true, args: ARGS, timeout: 60000,
  });
  const result = { responses: [], console: [], posted: [] };
  try {
    const page = context.pages()[0] || await context.newPage();
    page.on("response", (r) => {
      const u = new URL(r.url());
      if (!u.protocol.startsWith("http")) return;  // blob: URLs
      result.responses.push({ method: r.request().method(), path: u.pathname, status: r.status() });
    });
    const answered = [];
    page.on("response", (r) => {  // the job JSON the service echoed for each submission it took
      if (r.request().method() === "POST" && r.status() === 201) answered.push(r.json().then((j) => result.posted.push(j)));
    });
    page.on("pageerror", (e) => result.console.push(String(e)));
    page.on("console", (m) => {  // HTTP errors are in `responses`; keep the script's own
      if (m.type() === "error" && !m.text().startsWith("Failed to load resource")) result.console.push(m.text());
    });

    const loaded = await page.goto(spec.url);
    result.pageStatus = loaded.status();
    const f = spec.form;
    await page.setInputFiles("#file", spec.file);
    await page.fill("#prompt", f.prompt || "");
    for (const [i, concept] of (f.concepts || []).entries()) {
      await page.click("#add-concept");
      await page.fill(`#prompt-${i + 2}`, concept);
    }
    if (f.promptFrame != null || (f.boxes || []).length) {
      await page.waitForFunction(() => !document.getElementById("scrub").disabled, null, { timeout: 15000 });
    }
    if (f.promptFrame != null) {  // dragged on the scrubber as a person would: the field follows it
      await page.fill("#frame", String(f.promptFrame));
      await page.dispatchEvent("#frame", "change");
      result.scrubbed = await page.evaluate(() => Number(document.getElementById("scrub").value));
    }
    for (const { box, label } of f.boxes || []) {
      const r = await page.evaluate(() => {
        const c = document.querySelector("#preview canvas").getBoundingClientRect();
        return { x: c.left, y: c.top, sx: c.width / document.querySelector("#preview canvas").width,
                 sy: c.height / document.querySelector("#preview canvas").height };
      });
      if (!label) await page.keyboard.down("Shift");
      await page.mouse.move(r.x + box[0] * r.sx, r.y + box[1] * r.sy);
      await page.mouse.down();
      await page.mouse.move(r.x + (box[0] + box[2]) * r.sx, r.y + (box[1] + box[3]) * r.sy, { steps: 5 });
      await page.mouse.up();
      if (!label) await page.keyboard.up("Shift");
    }
    if (f.mode) await page.selectOption("#mode", f.mode);
    if (f.threshold != null) await page.fill("#threshold", String(f.threshold));
    if (f.alpha != null) await page.fill("#alpha", String(f.alpha));
    if (f.maxObjects != null) await page.fill("#max-objects", String(f.maxObjects));
    if (f.token) await page.fill("#token", f.token);

    // Every progress value the page shows, as it shows it.
    await page.evaluate(() => {
      window.__seen = [];
      const bar = document.getElementById("progress"), stage = document.getElementById("stage");
      const note = () => window.__seen.push({ value: bar.value, max: bar.max, stage: stage.textContent });
      new MutationObserver(note).observe(bar, { attributes: true, attributeFilter: ["value", "max"] });
    });
    await page.click("#submit");

    const ended = await page.waitForFunction(() => {
      const error = document.getElementById("error");
      const video = document.querySelector("#result video");
      if (!error.hidden && error.textContent) return "error";
      if (!document.getElementById("result").hidden && video.readyState >= 1) return "result";
      return false;
    }, null, { timeout: spec.timeoutMs, polling: 50 }).then((h) => h.jsonValue(), () => "timeout");
    result.outcome = ended;

    if (ended === "result" && spec.seekTo != null) {  // seeking needs Range (206) or a blob: URL
      result.seeked = await page.evaluate((t) => new Promise((resolve) => {
        const video = document.querySelector("#result video");
        const timer = setTimeout(() => resolve(false), 10000);
        video.addEventListener("seeked", () => { clearTimeout(timer); resolve(video.currentTime); }, { once: true });
        video.currentTime = t;
      }), spec.seekTo);
    }
    await Promise.all(answered);
    Object.assign(result, await page.evaluate(() => {
      const bar = document.getElementById("progress"), error = document.getElementById("error");
      const video = document.querySelector("#result video");
      return {
        error: error.hidden ? null : error.textContent,
        errorVisible: !error.hidden && error.getBoundingClientRect().height > 0,
        progress: { value: bar.value, max: bar.max },
        seen: window.__seen,
        stage: document.getElementById("stage").textContent,
        video: { readyState: video.readyState, duration: video.duration, videoWidth: video.videoWidth,
                 videoHeight: video.videoHeight, src: video.currentSrc, error: video.error && video.error.message },
        downloads: [...document.querySelectorAll("#downloads a")]
          .map((a) => ({ text: a.textContent, href: a.getAttribute("href") })),
        submitEnabled: !document.getElementById("submit").disabled,
      };
    }));
  } catch (error) {
    result.outcome = "crash";
    result.crash = String(error && error.stack || error);
  } finally {
    await context.close();
  }
  process.stdout.write(JSON.stringify(result) + "\n");
})();
