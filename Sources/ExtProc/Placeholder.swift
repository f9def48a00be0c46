// Placeholder until the ExtProc layer lands.
