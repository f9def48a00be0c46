// Placeholder until the Kubernetes layer lands.
