"""A live camera view per selected camera: HLS in a ``<video>`` (hls.js, vendored from npm in
``dashboards/vendor/``, or the browser's native HLS), the rolling snapshot when the stream cannot
play, and PTZ buttons for operators (commands through the ledger).

The browser fetches the stream straight from the API with short-lived signed links
(``GET /api/v1/video/cameras/{camera}/urls``); the panel asks for fresh ones before they lapse.

```yaml
- {type: video, title: Gate, select: {tag: video}, player: hls, ptz: true, height: 320}
```
"""

from __future__ import annotations

import html
import json
import time
from functools import cache
from pathlib import Path
from typing import Any

import streamlit as st
import streamlit.components.v1 as components

from dashboards.client import ApiError, NotAvailable
from dashboards.core import Ctx

VENDOR = Path(__file__).resolve().parents[1] / "vendor"
RENEW_BEFORE = 120.0  # seconds before a link lapses: ask for a new one

PTZ_BUTTONS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("◀", {"action": "move", "pan": -10}),
    ("▶", {"action": "move", "pan": 10}),
    ("▲", {"action": "move", "tilt": 5}),
    ("▼", {"action": "move", "tilt": -5}),
    ("+", {"action": "move", "zoom": 1}),
    ("-", {"action": "move", "zoom": -1}),
    ("■", {"action": "stop"}),
)


@cache
def hls_js() -> str:
    return (VENDOR / "hls.light.min.js").read_text(encoding="utf-8")


def player_html(camera: str, links: dict[str, Any], base: str, height: int, mode: str) -> str:
    """The iframe's document: a muted live <video> (or snapshots), snapshot fallback."""
    hls = base + str(links["hls"])
    snap = base + str(links["snapshot"])
    conf = json.dumps({"hls": hls, "snapshot": snap, "mode": mode})
    script = hls_js() if mode == "hls" else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><style>
html,body{{margin:0;background:#111;height:100%}} video,img{{width:100%;height:{height}px;
object-fit:contain;background:#000;display:block}} .off{{display:none}}
#state{{position:absolute;top:6px;left:8px;color:#eee;font:12px sans-serif;
background:rgba(0,0,0,.5);padding:1px 5px;border-radius:3px}}</style></head><body>
<div id="state">{html.escape(camera)}</div>
<video id="video" data-camera="{html.escape(camera)}" muted autoplay playsinline></video>
<img id="snapshot" class="off" alt="{html.escape(camera)}">
<script>{script}</script>
<script>
(function () {{
  const c = {conf};
  const v = document.getElementById("video"), img = document.getElementById("snapshot");
  const label = document.getElementById("state");
  let timer = null;
  function snapshots(why) {{
    v.classList.add("off"); img.classList.remove("off");
    label.textContent = "{html.escape(camera)} · snapshot" + (why ? " (" + why + ")" : "");
    const next = () => {{ img.src = c.snapshot + "?t=" + Date.now(); }};
    next(); if (!timer) timer = setInterval(next, 1000);
  }}
  window.fluxPlayer = {{mode: c.mode}};
  if (c.mode !== "hls") {{ snapshots(""); return; }}
  if (window.Hls && Hls.isSupported()) {{
    const h = new Hls({{liveSyncDurationCount: 2, maxLiveSyncPlaybackRate: 1.5,
                       manifestLoadingMaxRetry: 6, levelLoadingMaxRetry: 6}});
    window.fluxPlayer.engine = "hls.js";
    h.on(Hls.Events.ERROR, (_, d) => {{
      if (!d.fatal) return;
      if (d.type === Hls.ErrorTypes.MEDIA_ERROR) {{ h.recoverMediaError(); return; }}
      snapshots(d.details); setTimeout(() => location.reload(), 10000);
    }});
    h.loadSource(c.hls); h.attachMedia(v);
    h.on(Hls.Events.MANIFEST_PARSED, () => v.play().catch(() => {{}}));
  }} else if (v.canPlayType("application/vnd.apple.mpegurl")) {{
    window.fluxPlayer.engine = "native";
    v.src = c.hls; v.addEventListener("error", () => snapshots("no HLS"));
  }} else {{ snapshots("no HLS player"); return; }}
  v.addEventListener("playing", () => {{ label.textContent = "{html.escape(camera)} · live"; }});
}})();
</script></body></html>"""


def _links(ctx: Ctx, camera: str) -> dict[str, Any]:
    """Signed links from the session's cache, renewed ``RENEW_BEFORE`` s before they lapse
    (unchanged links keep the player's iframe: it does not restart on every rerun)."""
    cache_: dict[str, dict[str, Any]] = st.session_state.setdefault("video_links", {})
    hit = cache_.get(camera)
    if hit is None or float(hit["expires"]) - time.time() < RENEW_BEFORE:
        hit = ctx.client.video_links(camera)
        cache_[camera] = hit
    return hit


def render(ctx: Ctx, panel: dict[str, Any]) -> None:
    if panel.get("title"):
        st.subheader(panel["title"])
    cameras = [d for d in ctx.selected(panel) if d.get("type") == "camera"]
    if not cameras:
        st.info("no camera matches this panel")
        return
    height = int(panel.get("height", 300))
    mode = str(panel.get("player", "hls"))
    ptz = bool(panel.get("ptz", True)) and ctx.login.can("operator")
    base = ctx.client.base_url
    cols = st.columns(min(2, len(cameras)))
    for i, cam in enumerate(cameras):
        name = str(cam["name"])
        with cols[i % len(cols)]:
            try:
                links = _links(ctx, name)
            except NotAvailable:
                st.warning("this server has no video API")
                return
            except ApiError as exc:
                st.warning(f"{name}: {exc}")
                continue
            components.html(player_html(name, links, base, height, mode), height=height + 4)
            st.caption(f"{name} · {cam.get('status', '?')}")
            if ptz:
                buttons = st.columns(len(PTZ_BUTTONS))
                for b, (label, params) in zip(buttons, PTZ_BUTTONS, strict=True):
                    if b.button(label, key=f"ptz-{name}-{params.get('action')}-{label}",
                                help=f"ptz {params}"):
                        try:
                            ctx.client.send_command(name, "ptz", dict(params))
                        except ApiError as exc:
                            st.warning(f"{name}: {exc}")
