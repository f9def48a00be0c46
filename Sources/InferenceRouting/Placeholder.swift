// Placeholder until the InferenceRouting layer lands.
