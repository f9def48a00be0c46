// Placeholder until the GRPCServer layer lands.
