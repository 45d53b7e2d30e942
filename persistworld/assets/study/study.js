// The trial page: one clock drives every video of a trial (all frames are key frames, so a seek
// lands exactly), the scrubber sets the frame of all of them, votes go to the JSON API.
"use strict";
const token = location.pathname.split("/")[2];
const api = (path) => `/api/r/${token}/${path}`;
const $ = (id) => document.getElementById(id);
let st = null, frame = 0, timer = null, shownAt = 0, busy = false;

function videos() { return Array.from(document.querySelectorAll("#trial video")); }

function setFrame(f) {
  frame = f;
  const t = (f + 0.5) / st.fps;                       // the middle of frame f
  for (const v of videos()) v.currentTime = t;
  $("scrubber").value = String(f);
  $("frame-label").textContent = `frame ${f + 1} / ${st.num_frames}`;
}
function play() {
  if (timer) return;
  timer = setInterval(() => setFrame((frame + 1) % st.num_frames), 1000 / st.fps);
  $("play").textContent = "pause";
}
function pause() { clearInterval(timer); timer = null; $("play").textContent = "play"; }

function fill(id, urls) {
  const box = $(id);
  box.replaceChildren();
  for (const view of st.views) {
    const v = document.createElement("video");
    v.muted = true; v.playsInline = true; v.preload = "auto"; v.src = urls[view];
    v.title = view; v.dataset.view = view;
    box.appendChild(v);
  }
}

function show(state) {
  st = state;
  $("progress").max = st.total; $("progress").value = st.done;
  $("progress-text").textContent = `${st.done} of ${st.total} done`;
  pause();
  if (!st.next) { $("trial").hidden = true; $("finished").hidden = false; return; }
  $("finished").hidden = true; $("trial").hidden = false;
  fill("reference", st.next.reference); fill("left", st.next.left); fill("right", st.next.right);
  $("scrubber").max = String(st.num_frames - 1);
  document.body.dataset.trial = st.next.trial;
  setFrame(0); play(); shownAt = performance.now(); busy = false;
}

function fail(msg) { $("error").textContent = msg; $("error").hidden = false; }

async function load() {
  const r = await fetch(api("state"), { cache: "no-store" });
  if (!r.ok) { fail((await r.json()).detail || r.statusText); return; }
  $("error").hidden = true;
  show(await r.json());
}

async function vote(choice) {
  if (busy || !st || !st.next) return;
  busy = true;
  const body = { trial: st.next.trial, choice,
                 response_ms: Math.round(performance.now() - shownAt) };
  const r = await fetch(api("vote"), { method: "POST", cache: "no-store",
    headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
  if (r.status === 409) { await load(); return; }   // already counted (e.g. another tab)
  if (!r.ok) { busy = false; fail((await r.json()).detail || r.statusText); return; }
  show((await r.json()).state);
}

$("vote-left").addEventListener("click", () => vote("left"));
$("vote-right").addEventListener("click", () => vote("right"));
$("play").addEventListener("click", () => (timer ? pause() : play()));
$("scrubber").addEventListener("input", (e) => { pause(); setFrame(Number(e.target.value)); });
$("help").href = `/r/${token}`;
document.addEventListener("keydown", (e) => {
  if (e.key === "ArrowLeft") { e.preventDefault(); vote("left"); }
  else if (e.key === "ArrowRight") { e.preventDefault(); vote("right"); }
  else if (e.key === " ") { e.preventDefault(); timer ? pause() : play(); }
});
load();
