// Placeholder until the NGHTTP2Server layer lands.
