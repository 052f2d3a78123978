"""A real RTSP camera for the tests: GStreamer's RTSP server (gst-rtsp-server) serving a live
H.264 test pattern at rtsp://127.0.0.1:PORT/live, optionally behind Basic and Digest auth.

Run with the *system* Python (Debian's python3-gi + gir1.2-gst-rtsp-server-1.0), not the venv:
    /usr/bin/python3 tests/video/rtsp_camera.py PORT [USER PASSWORD]
Prints "ready" when it listens.
"""

import os
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtsp", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402

PIPELINE = (
    "( videotestsrc is-live=true pattern=ball ! video/x-raw,format=I420,width={w},height={h},framerate=10/1"
    " ! x264enc name=enc tune=zerolatency speed-preset=ultrafast key-int-max={gop} bitrate={kbps}"
    " ! rtph264pay name=pay0 pt=96 config-interval=1 )"
)
"""320x180, GOP 1 s (10 frames), 300 kbit/s unless the environment says otherwise
(RTSP_CAMERA_SIZE=1280x720, RTSP_CAMERA_GOP=40 frames, RTSP_CAMERA_KBPS=2000: benchmarks).

A client's PLAY flushes GStreamer's shared media, encoder included, so a new session gets a
keyframe ~0.25 s after PLAY whatever the GOP; many cameras do not restart their encoder per
client. RTSP_CAMERA_STRICT_GOP=1 runs the encoder outside the media (``StrictGop``): a new
session waits for the encoder's next scheduled keyframe, up to one GOP (the worst case)."""


class StrictGop:
    """The encoder runs outside the RTSP media (its own pipeline, frames handed over through an
    appsrc): a client's PLAY flushes the media, not the encoder, so a new session joins in the
    middle of a GOP and waits for the next scheduled keyframe."""

    def __init__(self, w: str, h: str, gop: str, kbps: str) -> None:
        self.sources: list[Gst.Element] = []
        self.encoder = Gst.parse_launch(
            f"videotestsrc is-live=true pattern=ball ! video/x-raw,format=I420,width={w},height={h},"
            f"framerate=10/1 ! x264enc tune=zerolatency speed-preset=ultrafast key-int-max={gop}"
            f" bitrate={kbps} ! video/x-h264,stream-format=byte-stream,alignment=au"
            " ! appsink name=out emit-signals=true sync=false")
        self.encoder.get_by_name("out").connect("new-sample", self.on_sample)
        self.encoder.set_state(Gst.State.PLAYING)

    launch = ("( appsrc name=src is-live=true format=time do-timestamp=true"
              " caps=video/x-h264,stream-format=byte-stream,alignment=au"
              " ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=1 )")

    def on_sample(self, sink: Gst.Element) -> Gst.FlowReturn:
        buf = sink.emit("pull-sample").get_buffer()
        for src in list(self.sources):
            copy = buf.copy()
            copy.pts = copy.dts = Gst.CLOCK_TIME_NONE
            src.emit("push-buffer", copy)
        return Gst.FlowReturn.OK

    def configure(self, _factory: object, media: GstRtspServer.RTSPMedia) -> None:
        src = media.get_element().get_by_name("src")
        self.sources.append(src)
        media.connect("unprepared", lambda _m: self.sources.remove(src))


def main() -> None:
    Gst.init(None)
    port = sys.argv[1]
    user = sys.argv[2] if len(sys.argv) > 3 else None
    password = sys.argv[3] if len(sys.argv) > 3 else None
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(port)
    factory = GstRtspServer.RTSPMediaFactory()
    w, h = os.environ.get("RTSP_CAMERA_SIZE", "320x180").split("x")
    gop, kbps = os.environ.get("RTSP_CAMERA_GOP", "10"), os.environ.get("RTSP_CAMERA_KBPS", "300")
    if os.environ.get("RTSP_CAMERA_STRICT_GOP") == "1":
        strict = StrictGop(w, h, gop, kbps)
        factory.set_launch(strict.launch)
        factory.connect("media-configure", strict.configure)
    else:
        factory.set_launch(PIPELINE.format(w=w, h=h, gop=gop, kbps=kbps))
    factory.set_shared(True)
    if user:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string("media.factory.role", user)
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
        auth.add_digest(user, password, token)
        auth.set_supported_methods(GstRtsp.RTSPAuthMethod.DIGEST)  # challenge with Digest
        server.set_auth(auth)
        perms = GstRtspServer.RTSPPermissions()
        perms.add_permission_for_role(user, "media.factory.access", True)
        perms.add_permission_for_role(user, "media.factory.construct", True)
        factory.set_permissions(perms)
    server.get_mount_points().add_factory("/live", factory)
    if server.attach(None) == 0:
        print(f"cannot listen on {port}", flush=True)
        sys.exit(1)
    print("ready", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
