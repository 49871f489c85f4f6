// rustci dashboard: the live parts only (pages read fine without this script).
// - A job's log follows over the API's event stream from where the page's text starts,
//   rendered as a terminal would (SGR colours, \r rewriting the line); at most
//   MAX_LINES lines stay in the page, older ones leave it (the raw log has them all).
// - The job's state badge follows the job without a reload.
// - Parts marked data-refresh="N" are fetched again every N seconds.
// Log text reaches the page only through textContent, never as HTML; refreshed parts
// are the server's own escaped markup, parsed and put in place.
"use strict";

const MAX_LINES = 5000;
// A longer line is wrapped onto the next (drawing stays linear in what arrives).
const MAX_LINE_CHARS = 16384;
// An escape sequence never ends past this: the rest is text again.
const MAX_ESCAPE = 4096;

// ---- Terminal rendering -------------------------------------------------------------

function Term(pre) {
  this.pre = pre;
  this.style = { fg: null, bg: null, b: false, i: false, u: false, dim: false, fg256: null, bg256: null };
  this.chars = [];   // the current line: a character and a style number per cell
  this.styles = [];
  this.styleIds = new Map(); // style key -> number
  this.styleList = [];       // number -> {cls, fg, bg}
  this.col = 0;
  this.lineEl = null;
  this.pending = ""; // an escape sequence cut by a chunk boundary
  this.lines = 0;
  this.trimmed = 0;
  this.notice = null;
  this.newLine();
}

Term.prototype.newLine = function () {
  this.chars = [];
  this.styles = [];
  this.col = 0;
  this.lineEl = document.createElement("span");
  this.lineEl.className = "line";
  this.pre.appendChild(this.lineEl);
  this.lines++;
  if (this.lines > MAX_LINES) {
    const first = this.notice ? this.notice.nextSibling : this.pre.firstChild;
    if (first && first !== this.lineEl) {
      this.pre.removeChild(first);
      this.lines--;
      this.trimmed++;
      if (!this.notice) {
        this.notice = document.createElement("span");
        this.notice.className = "line trimmed";
        this.pre.insertBefore(this.notice, this.pre.firstChild);
      }
      this.notice.textContent = this.trimmed + " earlier lines left the page (see the raw log)";
    }
  }
};

Term.prototype.classes = function () {
  const s = this.style, c = [];
  if (this.err) c.push("err");
  if (s.b) c.push("b");
  if (s.i) c.push("i");
  if (s.u) c.push("u");
  if (s.dim) c.push("dim");
  if (s.fg !== null) c.push("f" + s.fg);
  if (s.bg !== null) c.push("g" + s.bg);
  return c.join(" ");
};

function color256(n) {
  if (n < 16) return null;
  if (n >= 232) { const v = 8 + (n - 232) * 10; return "rgb(" + v + "," + v + "," + v + ")"; }
  n -= 16;
  const steps = [0, 95, 135, 175, 215, 255];
  return "rgb(" + steps[Math.floor(n / 36)] + "," + steps[Math.floor(n / 6) % 6] + "," + steps[n % 6] + ")";
}

Term.prototype.sgr = function (params) {
  this.current = undefined;
  const p = params.length ? params.split(";").map(function (x) { return x === "" ? 0 : parseInt(x, 10); }) : [0];
  const s = this.style;
  for (let k = 0; k < p.length; k++) {
    const n = p[k];
    if (n === 0) { s.fg = s.bg = s.fg256 = s.bg256 = null; s.b = s.i = s.u = s.dim = false; }
    else if (n === 1) s.b = true;
    else if (n === 2) s.dim = true;
    else if (n === 3) s.i = true;
    else if (n === 4) s.u = true;
    else if (n === 22) { s.b = false; s.dim = false; }
    else if (n === 23) s.i = false;
    else if (n === 24) s.u = false;
    else if (n >= 30 && n <= 37) { s.fg = n - 30; s.fg256 = null; }
    else if (n === 39) { s.fg = null; s.fg256 = null; }
    else if (n >= 40 && n <= 47) { s.bg = n - 40; s.bg256 = null; }
    else if (n === 49) { s.bg = null; s.bg256 = null; }
    else if (n >= 90 && n <= 97) { s.fg = n - 90 + 8; s.fg256 = null; }
    else if (n >= 100 && n <= 107) { s.bg = n - 100 + 8; s.bg256 = null; }
    else if (n === 38 || n === 48) {
      let css = null, idx = null;
      if (p[k + 1] === 5) { const c = p[k + 2] || 0; if (c < 16) idx = c; else css = color256(c); k += 2; }
      else if (p[k + 1] === 2) { css = "rgb(" + (p[k + 2] || 0) + "," + (p[k + 3] || 0) + "," + (p[k + 4] || 0) + ")"; k += 4; }
      if (n === 38) { s.fg = idx; s.fg256 = css; } else { s.bg = idx; s.bg256 = css; }
    }
  }
};

// The number of the current style (styles are few: each gets a number once).
Term.prototype.styleId = function () {
  if (this.current !== undefined) return this.current;
  const cls = this.classes(), fg = this.style.fg256, bg = this.style.bg256;
  const key = cls + "|" + fg + "|" + bg;
  let id = this.styleIds.get(key);
  if (id === undefined) {
    id = this.styleList.length;
    this.styleList.push({ cls: cls, fg: fg, bg: bg });
    this.styleIds.set(key, id);
  }
  this.current = id;
  return id;
};

Term.prototype.put = function (ch, style) {
  if (this.col >= MAX_LINE_CHARS) { this.draw(); this.newLine(); }
  if (this.col < this.chars.length) {
    this.chars[this.col] = ch;
    this.styles[this.col] = style;
  } else {
    this.chars.push(ch);
    this.styles.push(style);
  }
  this.col++;
};

// Draws the current line: each run of cells of one style becomes one text node (plain)
// or span.
Term.prototype.draw = function () {
  const el = this.lineEl;
  while (el.firstChild) el.removeChild(el.firstChild);
  const n = this.chars.length;
  let start = 0;
  while (start < n) {
    const id = this.styles[start];
    let end = start + 1;
    while (end < n && this.styles[end] === id) end++;
    const text = this.chars.slice(start, end).join("");
    const st = this.styleList[id];
    if (!st.cls && !st.fg && !st.bg) {
      el.appendChild(document.createTextNode(text));
    } else {
      const run = document.createElement("span");
      if (st.cls) run.className = st.cls;
      if (st.fg) run.style.color = st.fg;        // CSSOM, allowed by the page's policy
      if (st.bg) run.style.backgroundColor = st.bg;
      run.textContent = text;
      el.appendChild(run);
    }
    start = end;
  }
};

// Writes `text`; `stderr` lists [start, end) ranges of it (UTF-16 units) that came from
// stderr.
Term.prototype.write = function (text, stderr) {
  const shift = this.pending.length;
  text = this.pending + text;
  this.pending = "";
  const ranges = (stderr || []).map(function (r) { return [r[0] + shift, r[1] + shift]; });
  let next = 0; // the first range not yet behind us
  let i = 0;
  while (i < text.length) {
    while (next < ranges.length && ranges[next][1] <= i) next++;
    const err = next < ranges.length && ranges[next][0] <= i;
    if (err !== !!this.err) { this.err = err; this.current = undefined; }
    const ch = text[i];
    if (ch === "\x1b") {
      if (i + 1 >= text.length) { this.pending = text.slice(i); break; }
      if (text[i + 1] === "[") {
        let j = i + 2;
        while (j < text.length && !(text.charCodeAt(j) >= 0x40 && text.charCodeAt(j) <= 0x7e)) j++;
        if (j >= text.length) {
          // Not ended yet: kept for the next chunk, unless it has gone on too long to
          // be an escape (then it is text).
          if (text.length - i > MAX_ESCAPE) { i += 2; continue; }
          this.pending = text.slice(i);
          break;
        }
        if (text[j] === "m") this.sgr(text.slice(i + 2, j));
        else if (text[j] === "K") {
          this.chars.length = Math.min(this.chars.length, this.col);
          this.styles.length = this.chars.length;
        }
        i = j + 1;
        continue;
      }
      if (text[i + 1] === "]") {
        let j = i + 2;
        while (j < text.length && text[j] !== "\x07" && text[j] !== "\x1b") j++;
        if (j >= text.length) {
          // Not ended yet: kept for the next chunk, unless it has gone on too long to
          // be an escape (then it is text).
          if (text.length - i > MAX_ESCAPE) { i += 2; continue; }
          this.pending = text.slice(i);
          break;
        }
        i = text[j] === "\x1b" ? j + 2 : j + 1;
        continue;
      }
      // ESC ( B and the like (character sets): three characters; other escapes two.
      i += "()*+".indexOf(text[i + 1]) >= 0 ? 3 : 2;
      continue;
    }
    if (ch === "\n") { this.draw(); this.newLine(); i++; continue; }
    if (ch === "\r") {
      if (text[i + 1] === "\n") { i++; continue; }
      this.col = 0; i++; continue;
    }
    if (ch === "\b") { if (this.col > 0) this.col--; i++; continue; }
    this.put(ch, this.styleId());
    i++;
  }
  this.draw();
  const box = this.pre;
  if (box.dataset.stick !== "0") box.scrollTop = box.scrollHeight;
};

// ---- Job page -----------------------------------------------------------------------

function setState(state) {
  document.querySelectorAll("h1 .badge").forEach(function (b) {
    b.textContent = state;
    b.dataset.state = state;
    b.className = "badge state-" + state;
  });
  const terminal = ["succeeded", "failed", "cancelled", "timed_out", "lost"];
  if (terminal.indexOf(state) >= 0 && !setState.ended) {
    setState.ended = true;
    const c = document.getElementById("cancel");
    if (c) c.remove();
    replaceParts(["facts", "attempts", "transitions"]);
  }
}

// Fetches the page again and puts its fresh copies of the elements `ids` in place.
function replaceParts(ids) {
  return fetch(location.href, { credentials: "same-origin" })
    .then(function (r) { return r.ok ? r.text() : null; })
    .then(function (html) {
      if (!html) return;
      const doc = new DOMParser().parseFromString(html, "text/html");
      ids.forEach(function (id) {
        const fresh = doc.getElementById(id);
        const now = document.getElementById(id);
        if (fresh && now) now.replaceWith(document.importNode(fresh, true));
      });
    })
    .catch(function () {});
}

function followLog(pre) {
  const job = pre.dataset.job;
  const start = pre.dataset.offset || "0";
  while (pre.firstChild) pre.removeChild(pre.firstChild);
  pre.dataset.live = "1";
  const term = new Term(pre);
  pre.addEventListener("scroll", function () {
    pre.dataset.stick = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4 ? "1" : "0";
  });
  const es = new EventSource("/api/jobs/" + encodeURIComponent(job) + "/logs?follow=true&offset=" + start);
  es.addEventListener("log", function (e) {
    const d = JSON.parse(e.data);
    term.write(d.text, d.stderr);
  });
  es.addEventListener("end", function (e) {
    const d = JSON.parse(e.data);
    if (d.text) term.write(d.text);
    if (d.state) setState(d.state);
    pre.dataset.ended = "1";
    es.close();
  });
}

function watchState(facts) {
  const job = facts.dataset.job;
  const tick = function () {
    fetch("/api/jobs/" + encodeURIComponent(job), { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (j) {
        if (!j) { setTimeout(tick, 5000); return; }
        setState(j.state);
        if (["succeeded", "failed", "cancelled", "timed_out", "lost"].indexOf(j.state) < 0) {
          setTimeout(tick, 1000);
        }
      })
      .catch(function () { setTimeout(tick, 3000); });
  };
  setTimeout(tick, 1000);
}

// ---- Refreshed parts ----------------------------------------------------------------

function refresh(el) {
  const every = parseInt(el.dataset.refresh, 10) * 1000;
  if (!el.id || !(every > 0)) return;
  const id = el.id;
  setInterval(function () {
    if (!document.hidden) replaceParts([id]);
  }, every);
}

document.addEventListener("DOMContentLoaded", function () {
  const log = document.getElementById("log");
  if (log && log.dataset.follow === "1") followLog(log);
  const facts = document.getElementById("facts");
  if (facts && log && log.dataset.follow === "1") watchState(facts);
  document.querySelectorAll("[data-refresh]").forEach(refresh);
});
