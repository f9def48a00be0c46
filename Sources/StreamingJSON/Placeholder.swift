// Placeholder until the StreamingJSON layer lands.
