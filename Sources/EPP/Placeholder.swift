// Placeholder until the EPP layer lands.
