"""GB/T 28181: a SIP server of our own for device registration, keepalives, Catalog and live
view (PS over RTP), and the ``gb28181`` video source that plugs it into the camera pipelines."""
