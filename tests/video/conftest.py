from __future__ import annotations

import shutil

# ffmpeg is a required peer (installed by .ci/run): these tests fail, never skip, without it
assert shutil.which("ffmpeg"), "ffmpeg is required for the video tests (apt-get install ffmpeg)"
