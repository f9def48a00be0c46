// Placeholder until the OpenSSLTLS layer lands.
