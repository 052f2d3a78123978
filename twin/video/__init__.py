"""Video: camera sources (``sources``), one supervised ffmpeg per camera (``pipeline``), the
in-process HTTP-FLV hub (``flvhub``) and recordings with retention (``recordings``)."""
